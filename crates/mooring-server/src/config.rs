//! Server configuration: the TOML file format, defaults, and validation at load time.
//!
//! Precedence is flags > `MOORING_*` environment > TOML file > defaults; the binary resolves
//! flags and env (clap) and calls [`ServerConfig::load`] / [`ServerConfig::apply`] for the rest.

use anyhow::{bail, Context};
use mooring_proto::policy::{Policy, Rule};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_DATA_DIR: &str = "./mooring-data";
pub const DEFAULT_MQTT_ADDR: &str = "0.0.0.0:8883";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";

/// Everything `mooring serve` needs, after merging file, env and flags.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// MQTT over TLS with client certificates.
    pub mqtt_addr: SocketAddr,
    /// Optional plain, anonymous, unrestricted MQTT for local experiments. Loopback only.
    pub mqtt_dev_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    /// Serve the HTTP API over TLS with the server certificate.
    pub http_tls: bool,
    /// DNS names / IP addresses put in the server certificate at first start.
    pub server_names: Vec<String>,
    /// This node's name in `/healthz` and `/metrics` (`mooring_node_info{node=...}`), so a
    /// monitor behind a load balancer can tell which node answered. Default: the host name.
    pub node_id: String,
    pub telemetry: TelemetryConfig,
    pub certificates: CertificateConfig,
    pub policy: PolicyConfig,
    pub limits: LimitsConfig,
    pub commands: CommandsConfig,
    pub http: HttpConfig,
    /// Where state lives: absent `url` is the embedded SQLite in `data_dir`.
    pub store: StoreConfig,
    /// What crosses nodes: absent `url` is the in-process bus (one node).
    pub bus: BusUrlConfig,
    /// How the nodes sharing one store coordinate.
    pub cluster: ClusterConfig,
    /// People's logins: sessions, throttling, password links (issue 14).
    pub auth: AuthConfig,
    /// The audit log of every write through the API.
    pub audit: AuditConfig,
    /// OpenID Connect login (docs/access.md). Absent: no OIDC login.
    pub oidc: Option<OidcConfig>,
    /// Live event streams (`GET /api/v1/events`).
    pub events: crate::events::EventsConfig,
    /// Fleet statistics (`/api/v1/fleet/*`, docs/fleet.md).
    pub fleet: FleetConfig,
    /// Background jobs: bulk actions on a selection of devices (docs/jobs.md).
    pub jobs: JobsConfig,
    /// Enrollment with claim tokens (docs/provisioning.md).
    pub provisioning: ProvisioningConfig,
    /// Installation confirmations (docs/provisioning.md).
    pub installations: InstallationsConfig,
    /// Over-the-air updates: artifacts, the update key, download tokens (docs/ota.md).
    pub ota: OtaConfig,
    /// Fleet health signals and the cohort test (docs/health.md).
    pub health: crate::health::HealthConfig,
    /// Rules and alerts (docs/health.md).
    pub rules: crate::rules::RulesConfig,
    /// Staged rollouts gated on fleet health (docs/ota.md#rollouts).
    pub rollouts: crate::rollouts::RolloutsConfig,
    /// Webhooks rules notify (`[[webhook]]`, docs/health.md).
    #[serde(rename = "webhook")]
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
    /// Email channels alerts go to (`[[email]]`, docs/health.md).
    #[serde(rename = "email")]
    pub emails: Vec<crate::emails::EmailConfig>,
    /// Playbooks alerts run (`[[playbook]]`, docs/health.md#playbooks).
    #[serde(rename = "playbook")]
    pub playbooks: Vec<crate::playbooks::PlaybookConfig>,
    /// The parts tickets suggest (`[[part]]`, docs/health.md#playbooks).
    #[serde(rename = "part")]
    pub parts: Vec<crate::playbooks::PartConfig>,
}

/// `[ota]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtaConfig {
    /// Largest artifact file (default 1 GiB).
    pub artifact_size_bytes_max: u64,
    /// Most artifacts stored at once (default 1000).
    pub artifacts_max: u32,
    /// The update key's public half (64 hex digits) when its private key is kept offline
    /// (`mooring ota keygen`): the server never signs, and an upload completes only with a
    /// signature that verifies. Absent: the server's own key (created at first start) signs.
    pub update_public_key: Option<String>,
    /// How long a download link's token is valid (default 1 hour).
    pub download_token_ttl_ms: u64,
    /// Artifact downloads served at once by this node (default 64; at most half of
    /// `[http] connections_max`, so the rest stay for the API). Beyond it: 503
    /// `too_many_downloads`, retry later.
    pub downloads_max: usize,
    /// Downloads one device may have at once (default 2): beyond it, 429 `too_many_downloads`.
    pub downloads_per_device_max: usize,
    /// A download whose client has not taken the next 64 KiB within this long (default 60 s)
    /// ends and gives its place back (the device resumes with `Range`).
    pub download_idle_timeout_ms: u64,
    /// The slowest a download may go (default 1024 bytes/s; 0: no floor): once
    /// `download_idle_timeout_ms` has passed, a client that has taken fewer than this many bytes
    /// per second since the download began loses it and its place (a trickling client cannot
    /// hold a place for hours; the device resumes with `Range`).
    pub download_min_rate_bytes_per_s: u64,
    /// An artifact still `uploading` this long after it was created (default 24 h) is an
    /// abandoned upload: the OTA sweeper deletes it with its bytes.
    pub upload_ttl_ms: u64,
    /// How often the OTA sweeper runs (default 60 s; at start too): it sends the updates a crash
    /// left unsent and deletes abandoned uploads (one node of a cluster, lease `ota.sweeper`).
    pub sweep_interval_ms: u64,
    /// Deployments stored at once (default 1000): creating one more is refused (503
    /// `too_many_deployments`) until one is deleted.
    pub deployments_max: u32,
    /// How long a device that acknowledged an update command may take to answer it (default
    /// 10 min; the agent answers at once): past it, the command fails with `timeout` and an
    /// update the device never reported on is `failed` (`command_failed: timeout`).
    pub update_answer_timeout_ms: u64,
    /// OTA status reports plus link requests one device may send per minute (default 120, at
    /// least 60; an update needs about 20): past it, a report is not acknowledged (MQTT 5:
    /// reason `0x97`; 3.1.1: the connection closes) so the device sends it again later, and a
    /// link request is answered `rate_limited` (the agent retries).
    pub reports_per_minute_max: u32,
}

impl Default for OtaConfig {
    fn default() -> Self {
        Self {
            artifact_size_bytes_max: 1024 * 1024 * 1024,
            artifacts_max: 1000,
            update_public_key: None,
            download_token_ttl_ms: 3_600_000,
            downloads_max: 64,
            downloads_per_device_max: 2,
            download_idle_timeout_ms: 60_000,
            download_min_rate_bytes_per_s: 1024,
            upload_ttl_ms: 86_400_000,
            sweep_interval_ms: 60_000,
            deployments_max: 1000,
            update_answer_timeout_ms: 600_000,
            reports_per_minute_max: 120,
        }
    }
}

/// `[installations]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstallationsConfig {
    /// An installation is accepted only if the device's telemetry was stored this recently
    /// (default 10 minutes): it is connected and working where the installer stands.
    pub seen_within_ms: u64,
}

impl Default for InstallationsConfig {
    fn default() -> Self {
        Self {
            seen_within_ms: 600_000,
        }
    }
}

/// `[provisioning]`: the bounds of claims and of enrolling clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvisioningConfig {
    /// Live (not revoked, not expired) claims one creator (token or user) may hold.
    pub claims_per_creator_max: u32,
    /// Live claims in all.
    pub claims_max: u32,
    /// Longest claim lifetime (`--ttl`).
    pub claim_ttl_max_ms: u64,
    /// MQTT connections with one claim's token at once.
    pub connections_per_claim_max: u32,
    /// MQTT claim connections at once on this node.
    pub connections_max: u32,
    /// Enrollment requests one MQTT claim client (by client id) may send per minute; more are
    /// rejected with `rate_limited`.
    pub requests_per_minute_max: u32,
    /// Failed enrollments (unknown, expired or revoked token) from one address within
    /// `[auth] login_window_ms`, over HTTPS and MQTT together, after which that address is
    /// refused (`too_many_attempts`) until the window ends.
    pub enroll_failures_per_address_max: u32,
}

impl Default for ProvisioningConfig {
    fn default() -> Self {
        Self {
            claims_per_creator_max: 1_000,
            claims_max: 100_000,
            claim_ttl_max_ms: crate::provision::CLAIM_TTL_MS_MAX,
            connections_per_claim_max: 100,
            connections_max: 10_000,
            requests_per_minute_max: 10,
            enroll_failures_per_address_max: 20,
        }
    }
}

/// `[fleet]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// How often each node records its fleet sample (devices, online, points, messages): the
    /// history's step.
    pub sample_interval_ms: u64,
}

/// Shortest `[fleet] sample_interval_ms` (tests use short intervals; a minute is the default).
pub const FLEET_SAMPLE_INTERVAL_MS_MIN: u64 = 100;

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            sample_interval_ms: 60_000,
        }
    }
}

/// `[jobs]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Devices per batch: a job's progress (done, failed, cursor) is stored after each batch,
    /// and a cancel takes effect at the next one. 1..=500.
    pub batch_len: usize,
    /// How often the runner looks for queued jobs when it was not woken (a job created on
    /// this node wakes it at once).
    pub poll_interval_ms: u64,
    /// A pause after every turn of a job (a batch, a report's page; 0: none). For tests and to
    /// go easy on a busy server.
    pub batch_pause_ms: u64,
    /// Worker tasks in this node (0: this node runs no jobs; a `mooring worker` or another
    /// node does). `mooring worker` runs this many too.
    pub workers: usize,
    /// A worker's lease on the job it runs, renewed by every progress write: a worker that
    /// dies mid-turn has its job taken over this long after its last write.
    pub lease_ms: u64,
    /// Attempts (failed turns, or turns whose worker died) before a job is `dead`.
    pub attempts_max: u32,
    /// The wait before the first retry of a failed turn; it doubles with each attempt.
    pub retry_backoff_ms: u64,
    /// Telemetry points a report reads per turn (its progress is stored after each).
    pub report_points_per_turn: usize,
    /// The largest report result; a report that would be larger fails, saying so.
    pub report_bytes_max: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            batch_len: crate::jobs::BATCH_LEN_MAX,
            poll_interval_ms: 1_000,
            batch_pause_ms: 0,
            workers: 1,
            lease_ms: 30_000,
            attempts_max: 5,
            retry_backoff_ms: 1_000,
            report_points_per_turn: 10_000,
            report_bytes_max: 256 << 20,
        }
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A login session unused this long ends.
    pub session_idle_ms: u64,
    /// A login session ends this long after the login, used or not.
    pub session_absolute_ms: u64,
    /// Most sessions one user holds; a new login beyond it ends the least recently used one.
    pub sessions_per_user_max: usize,
    /// Failed logins of one account within `login_window_ms` after which its logins are
    /// refused (`429`) until the window ends.
    pub login_failures_per_account_max: u32,
    /// Failed logins from one source address within `login_window_ms` after which logins from
    /// it are refused until the window ends.
    pub login_failures_per_address_max: u32,
    pub login_window_ms: u64,
    /// How long a password-set link (from `mooring user create`) stays valid.
    pub password_link_ttl_ms: u64,
    /// The URL people reach this server's web UI and API at, for password-set links
    /// (default: from `http_addr` and whether the API uses TLS).
    pub public_url: Option<String>,
    /// Take the client address from the last `X-Forwarded-For` entry (set it only behind a
    /// load balancer that appends it): login throttling and the audit log use that address.
    pub trust_forwarded_for: bool,
    /// Browser origins (e.g. `https://fleet.example.com`) allowed to call the API with
    /// credentials (CORS). Empty: same origin only.
    pub cors_origins: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            session_idle_ms: 8 * 3_600_000,
            session_absolute_ms: 7 * 24 * 3_600_000,
            sessions_per_user_max: 20,
            login_failures_per_account_max: 5,
            login_failures_per_address_max: 50,
            login_window_ms: 15 * 60_000,
            password_link_ttl_ms: 72 * 3_600_000,
            public_url: None,
            trust_forwarded_for: false,
            cors_origins: Vec::new(),
        }
    }
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Entries older than this are deleted.
    pub retention_days: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 365,
        }
    }
}

/// `[oidc]`: login through an OpenID provider (authorization code + PKCE); see
/// [`crate::oidc`] and docs/access.md.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's issuer URL, exactly as its ID tokens name it (`iss`); discovery reads
    /// `<issuer>/.well-known/openid-configuration`. `https://`, or `http://` on loopback only.
    pub issuer: String,
    pub client_id: String,
    /// A file (0600, like every secret file) holding the client secret. Absent: a public
    /// client (PKCE only, no secret).
    pub client_secret_file: Option<PathBuf>,
    /// Refused: a secret inline in the config file ends up in backups, diffs and bug reports.
    /// Only here to say so clearly (use `client_secret_file`).
    #[serde(default)]
    pub client_secret: Option<InlineSecret>,
    /// Where the provider sends the browser back: this server's
    /// `/api/v1/auth/oidc/callback`, as registered at the provider.
    pub redirect_url: String,
    #[serde(default = "default_oidc_scopes")]
    pub scopes: Vec<String>,
    /// The ID token claim whose value (a string, or an array of strings) maps to a role.
    #[serde(default = "default_oidc_role_claim")]
    pub role_claim: String,
    /// Claim value → role name (`admin`, `operator`, `installer`, `viewer`, `service`). Of
    /// several mapped values, the most privileged role wins.
    #[serde(default)]
    pub role_map: BTreeMap<String, String>,
    /// The role of a user none of whose claim values is mapped. Absent: such a user is refused.
    pub default_role: Option<String>,
    /// A claim whose string value is a fleet selector limiting what the user may act on.
    /// Absent (or a user without the claim): no limit beyond the role.
    pub scope_claim: Option<String>,
    /// The claim holding the user's e-mail address (refused when `email_verified` is false).
    #[serde(default = "default_oidc_email_claim")]
    pub email_claim: String,
    /// A PEM file of CA certificates trusted for the provider's HTTPS, instead of the system's
    /// trust roots (a provider behind a private CA).
    pub ca_file: Option<PathBuf>,
}

/// A secret written inline in the config file: never printed (`Debug` redacts it).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct InlineSecret(#[allow(dead_code)] String);

impl std::fmt::Debug for InlineSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

fn default_oidc_scopes() -> Vec<String> {
    ["openid", "email", "profile"].map(String::from).to_vec()
}

fn default_oidc_role_claim() -> String {
    "mooring_role".to_owned()
}

fn default_oidc_email_claim() -> String {
    "email".to_owned()
}

impl OidcConfig {
    /// Checks the `[oidc]` table: URLs, roles, claims (not the secret file, read at start).
    pub fn validate(&self) -> anyhow::Result<()> {
        use crate::oidc::ROLES;
        if self.client_secret.is_some() {
            bail!("oidc.client_secret refused: do not put the secret in the config file; write it to a file only the server's user can read (chmod 600) and name it in oidc.client_secret_file");
        }
        check_oidc_url("oidc.issuer", &self.issuer)?;
        check_oidc_url("oidc.redirect_url", &self.redirect_url)?;
        if self.client_id.trim().is_empty() {
            bail!("oidc.client_id must not be empty");
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            bail!("oidc.scopes must include \"openid\"");
        }
        if let Some(bad) = self
            .scopes
            .iter()
            .find(|s| s.is_empty() || s.chars().any(|c| c.is_whitespace()))
        {
            bail!("oidc.scopes: {bad:?} is not a scope (no spaces, not empty)");
        }
        for (name, claim) in [
            ("role_claim", &self.role_claim),
            ("email_claim", &self.email_claim),
        ]
        .into_iter()
        .chain(self.scope_claim.as_ref().map(|c| ("scope_claim", c)))
        {
            if claim.trim().is_empty() {
                bail!("oidc.{name} must not be empty");
            }
        }
        for (value, role) in &self.role_map {
            if !ROLES.contains(&role.as_str()) {
                bail!(
                    "oidc.role_map: {value:?} maps to unknown role {role:?}; roles are {}",
                    ROLES.join(", ")
                );
            }
        }
        if let Some(role) = &self.default_role {
            if !ROLES.contains(&role.as_str()) {
                bail!(
                    "oidc.default_role: unknown role {role:?}; roles are {}",
                    ROLES.join(", ")
                );
            }
        }
        if self.role_map.is_empty() && self.default_role.is_none() {
            bail!("oidc: set role_map (claim value -> role) or default_role, else no one could log in");
        }
        Ok(())
    }
}

/// An absolute `https://` URL (or `http://` to a loopback host, for development), no fragment.
fn check_oidc_url(name: &str, text: &str) -> anyhow::Result<()> {
    let url = openidconnect::url::Url::parse(text)
        .with_context(|| format!("{name} {text:?} is not a URL"))?;
    let loopback = match url.host() {
        Some(openidconnect::url::Host::Domain(d)) => d == "localhost",
        Some(openidconnect::url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(openidconnect::url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => bail!("{name} {text:?} must be an https:// URL (http:// only to localhost)"),
    }
    if url.host().is_none() || url.fragment().is_some() || !url.username().is_empty() {
        bail!("{name} {text:?} must be an absolute URL with a host, no user name and no #fragment");
    }
    Ok(())
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://user@host:port/db` (any libpq URL): the shared PostgreSQL database of a
    /// cluster. Absent: the embedded SQLite database in the data dir.
    pub url: Option<String>,
    /// Most PostgreSQL connections this node opens (nodes × pool_size must stay below the
    /// database's `max_connections`).
    pub pool_size: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            pool_size: 16,
        }
    }
}

/// `[bus]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusUrlConfig {
    /// `nats://host:port`: NATS (with JetStream) shared by the cluster's nodes. Absent: an
    /// in-process bus, enough for one node.
    pub url: Option<String>,
    /// Prefix of every NATS subject and stream this cluster uses, so several clusters can share
    /// one NATS (`[A-Za-z0-9-]`, at most 32 bytes).
    pub prefix: String,
    /// Messages one node buffers from the bus before newer ones are dropped (counted in
    /// `mooring_cluster_bus_dropped_total`).
    pub buffer_len: usize,
}

impl Default for BusUrlConfig {
    fn default() -> Self {
        Self {
            url: None,
            prefix: "mooring".to_owned(),
            buffer_len: 65_536,
        }
    }
}

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// A file every node has (0600: 64 hex digits, e.g. `openssl rand -hex 32`): the key that
    /// encrypts the fleet CA's and the server's private keys in a shared database. Required with
    /// `[store] url`.
    pub secret_key_file: Option<PathBuf>,
    /// How often a node records that it is alive.
    pub heartbeat_interval_ms: u64,
    /// A node not heard from for this long is dead: its devices are offline and its leases
    /// (for once-only work: command scheduler, retention, compaction) go to another node.
    pub node_lease_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            secret_key_file: None,
            heartbeat_interval_ms: 1_000,
            node_lease_ms: 5_000,
        }
    }
}

/// Bounds on the HTTP API listener, so slow or idle clients cannot hold its connections (and the
/// process's file descriptors, shared with the MQTT listeners) forever.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Longest wait for a complete request header: from accept (or the end of the previous
    /// response on a kept-alive connection) to the header's last byte. So it is also the idle
    /// keep-alive timeout: hyper runs one timer for both. Then the connection is closed.
    pub header_read_timeout_ms: u64,
    /// Longest wait for the next piece of a request body; then the request answers
    /// `408 request_timeout` and the connection is closed.
    pub request_body_timeout_ms: u64,
    /// Most open API connections (TLS handshakes included). Further clients wait in the
    /// kernel's accept backlog, holding none of the process's file descriptors.
    pub connections_max: usize,
    /// Serve the dashboard's files from this directory (a checkout's `web/`) instead of the
    /// copies embedded in the binary: for editing the dashboard without rebuilding.
    pub web_dir: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 10_000,
            request_body_timeout_ms: 10_000,
            connections_max: 256,
            web_dir: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// Time to live of a command created without `ttl_secs`.
    pub default_ttl_secs: u64,
    /// Deliveries of a command created without `max_attempts`.
    pub default_max_attempts: u32,
    /// Wait before the first redelivery of an unacknowledged command; doubles per attempt.
    pub retry_backoff_initial_ms: u64,
    /// Longest wait between redeliveries.
    pub retry_backoff_max_ms: u64,
    /// How often the scheduler looks for expired commands and due retries.
    pub scheduler_tick_ms: u64,
    /// How long an acknowledged command created without `result_timeout_secs` may wait for its
    /// result before it fails with `timeout` (0: no limit).
    pub default_result_timeout_secs: u64,
    /// Devices per transaction (and per registry page) when a fleet command fans out.
    pub fleet_page_len: usize,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            default_ttl_secs: 86_400,
            default_max_attempts: 5,
            retry_backoff_initial_ms: 5_000,
            retry_backoff_max_ms: 300_000,
            scheduler_tick_ms: 1_000,
            default_result_timeout_secs: 3_600,
            fleet_page_len: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Points older than this are deleted by the retention task.
    pub retention_days: u32,
    /// How often the retention task runs.
    pub retention_interval_secs: u64,
    /// Group-commit writer: most records in one transaction.
    pub batch_len_max: usize,
    /// Group-commit writer: most records waiting.
    pub queue_len_max: usize,
    /// Most distinct metric names one device may have stored (they outlive retention, as its
    /// last known values do); a message naming one more is refused (v5 PUBACK 0x97).
    pub metrics_per_device_max: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CertificateConfig {
    /// Validity of device certificates issued by `device create`.
    pub device_validity_days: u32,
    /// `/metrics` counts active certificates expiring within this many days
    /// (`mooring_certificates_expiring`); 1..=3650.
    pub expiring_warn_days: u32,
    /// How often each node re-checks its live device sessions' certificates (expired while
    /// connected, revoked elsewhere with the notice lost); 100..=3600000.
    pub session_sweep_interval_ms: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Grants added to the defaults (`devices/{id}/#` for devices, read `devices/#` for services).
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub mqtt_packet_size_bytes_max: u32,
    pub mqtt_session_queue_len_max: usize,
    /// How often the in-memory `last_seen` values are written to the store.
    pub presence_flush_interval_secs: u64,
    /// Most connections on all MQTT listeners together.
    pub mqtt_connections_max: usize,
    /// Time allowed for a TLS handshake.
    pub tls_handshake_timeout_ms: u64,
    /// Topic + payload bytes queued for one MQTT session (QoS 0 dropped first when full).
    pub mqtt_session_queue_bytes_max: usize,
    /// A connection whose socket takes no bytes for this long while output waits is closed.
    pub mqtt_write_stall_timeout_ms: u64,
    /// Longest keepalive granted; keepalive 0 (or more) is supervised as this (× 1.5).
    pub mqtt_keepalive_secs_max: u16,
    /// Longest topic name or filter, in bytes.
    pub mqtt_topic_bytes_max: usize,
    /// Most levels in a topic name or filter.
    pub mqtt_topic_levels_max: usize,
    /// Subscriptions one session may hold.
    pub mqtt_subscriptions_per_session_max: usize,
    /// Retained messages one device (or service) may own.
    pub mqtt_retained_per_principal_max: usize,
    /// Topic + payload bytes of the retained messages one device (or service) may own.
    pub mqtt_retained_bytes_per_principal_max: usize,
    /// Retained messages published by clients, server-wide (the server's own, such as shadow
    /// deltas, are not counted and never refused).
    pub mqtt_retained_messages_max: usize,
    /// Topic + payload bytes of the retained messages clients published, server-wide.
    pub mqtt_retained_bytes_max: usize,
    /// Sessions of services and dev-listener clients, server-wide (device sessions are bounded
    /// by the registry and always admitted).
    pub mqtt_sessions_max: usize,
    /// Persistent sessions one service token may hold.
    pub mqtt_persistent_sessions_per_service_max: usize,
    /// Sessions (live or persisted) one service token may hold.
    pub mqtt_sessions_per_service_max: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            mqtt_addr: DEFAULT_MQTT_ADDR.parse().expect("valid default address"),
            mqtt_dev_addr: None,
            http_addr: DEFAULT_HTTP_ADDR.parse().expect("valid default address"),
            http_tls: false,
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            node_id: default_node_id(),
            telemetry: TelemetryConfig::default(),
            certificates: CertificateConfig::default(),
            policy: PolicyConfig::default(),
            limits: LimitsConfig::default(),
            commands: CommandsConfig::default(),
            http: HttpConfig::default(),
            store: StoreConfig::default(),
            bus: BusUrlConfig::default(),
            cluster: ClusterConfig::default(),
            auth: AuthConfig::default(),
            audit: AuditConfig::default(),
            oidc: None,
            events: crate::events::EventsConfig::default(),
            fleet: FleetConfig::default(),
            installations: InstallationsConfig::default(),
            ota: OtaConfig::default(),
            health: crate::health::HealthConfig::default(),
            rollouts: crate::rollouts::RolloutsConfig::default(),
            rules: crate::rules::RulesConfig::default(),
            webhooks: Vec::new(),
            emails: Vec::new(),
            playbooks: Vec::new(),
            parts: Vec::new(),
            jobs: JobsConfig::default(),
            provisioning: ProvisioningConfig::default(),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            retention_days: 30,
            retention_interval_secs: 3600,
            batch_len_max: 1024,
            queue_len_max: 65536,
            metrics_per_device_max: mooring_store::METRICS_PER_DEVICE_MAX_DEFAULT,
        }
    }
}

impl Default for CertificateConfig {
    fn default() -> Self {
        Self {
            device_validity_days: 3650,
            expiring_warn_days: 30,
            session_sweep_interval_ms: crate::registry::SESSION_CERT_SWEEP_INTERVAL_MS,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let broker = mooring_broker::BrokerConfig::default();
        Self {
            mqtt_packet_size_bytes_max: 256 * 1024,
            mqtt_session_queue_len_max: 1000,
            presence_flush_interval_secs: 10,
            mqtt_connections_max: 200_000,
            tls_handshake_timeout_ms: 10_000,
            mqtt_session_queue_bytes_max: broker.session_queue_bytes_max,
            mqtt_write_stall_timeout_ms: broker.write_stall_timeout_ms,
            mqtt_keepalive_secs_max: broker.keepalive_secs_max,
            mqtt_topic_bytes_max: broker.topic_bytes_max,
            mqtt_topic_levels_max: broker.topic_levels_max,
            mqtt_subscriptions_per_session_max: broker.subscriptions_per_session_max,
            mqtt_retained_per_principal_max: broker.retained_per_principal_max,
            mqtt_retained_bytes_per_principal_max: broker.retained_bytes_per_principal_max,
            mqtt_retained_messages_max: broker.retained_messages_max,
            mqtt_retained_bytes_max: broker.retained_bytes_max,
            mqtt_sessions_max: broker.sessions_max,
            mqtt_persistent_sessions_per_service_max: broker.persistent_sessions_per_principal_max,
            mqtt_sessions_per_service_max: broker.sessions_per_principal_max,
        }
    }
}

/// Longest node id.
pub const NODE_ID_LEN_MAX: usize = 64;

/// The host name (`/proc/sys/kernel/hostname`), if it is a valid node id; else `mooring`.
pub fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| is_valid_node_id(h))
        .unwrap_or_else(|| "mooring".to_owned())
}

/// 1 to [`NODE_ID_LEN_MAX`] letters, digits, `.`, `_` or `-` (safe in a label and a log line).
pub fn is_valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= NODE_ID_LEN_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ServerConfig {
    /// Reads a TOML config file (unknown keys are errors).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let config: ServerConfig = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        Ok(config)
    }

    /// Checks everything that can be checked before binding anything.
    fn validate_auth(&self) -> anyhow::Result<()> {
        let a = &self.auth;
        if a.session_idle_ms == 0
            || a.session_absolute_ms == 0
            || a.sessions_per_user_max == 0
            || a.login_failures_per_account_max == 0
            || a.login_failures_per_address_max == 0
            || a.login_window_ms == 0
            || a.password_link_ttl_ms == 0
        {
            bail!("auth.session_idle_ms, session_absolute_ms, sessions_per_user_max, login_failures_per_account_max, login_failures_per_address_max, login_window_ms and password_link_ttl_ms must be at least 1");
        }
        if let Some(url) = &a.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("auth.public_url {url:?} must start with http:// or https://");
            }
        }
        for origin in &a.cors_origins {
            let ok = (origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.ends_with('/')
                && axum::http::HeaderValue::from_str(origin).is_ok();
            if !ok {
                bail!("auth.cors_origins entry {origin:?} must be an origin like https://fleet.example.com (scheme and host, no path or trailing slash)");
            }
        }
        if self.audit.retention_days == 0 {
            bail!("audit.retention_days must be at least 1");
        }
        Ok(())
    }

    /// The URL password-set links start with.
    pub fn public_url(&self) -> String {
        match &self.auth.public_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let scheme = if self.http_tls { "https" } else { "http" };
                format!("{scheme}://{}", self.http_addr)
            }
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(dev) = self.mqtt_dev_addr {
            if !dev.ip().is_loopback() {
                bail!(
                    "--mqtt-dev-addr {dev} refused: the development listener is anonymous and unrestricted, so it binds only loopback addresses (127.0.0.0/8 or ::1)"
                );
            }
        }
        if self.server_names.is_empty() {
            bail!("at least one --server-name is needed for the server certificate");
        }
        if !is_valid_node_id(&self.node_id) {
            bail!(
                "--node-id {:?} refused: use 1 to {NODE_ID_LEN_MAX} letters, digits, '.', '_' or '-'",
                self.node_id
            );
        }
        self.validate_auth()?;
        if self.telemetry.retention_days == 0 {
            bail!("telemetry.retention_days must be at least 1");
        }
        if self.telemetry.batch_len_max == 0
            || self.telemetry.queue_len_max == 0
            || self.telemetry.metrics_per_device_max == 0
        {
            bail!(
                "telemetry.batch_len_max, telemetry.queue_len_max and \
                 telemetry.metrics_per_device_max must be at least 1"
            );
        }
        if self.certificates.device_validity_days == 0 {
            bail!("certificates.device_validity_days must be at least 1");
        }
        if !(100..=3_600_000).contains(&self.certificates.session_sweep_interval_ms) {
            bail!("certificates.session_sweep_interval_ms must be between 100 and 3600000");
        }
        if !(1..=3650).contains(&self.certificates.expiring_warn_days) {
            bail!("certificates.expiring_warn_days must be between 1 and 3650");
        }
        let c = &self.commands;
        if c.default_ttl_secs == 0 || c.default_ttl_secs > crate::commands::TTL_SECS_MAX {
            bail!(
                "commands.default_ttl_secs must be between 1 and {}",
                crate::commands::TTL_SECS_MAX
            );
        }
        if c.default_max_attempts == 0 || c.default_max_attempts > crate::commands::MAX_ATTEMPTS_MAX
        {
            bail!(
                "commands.default_max_attempts must be between 1 and {}",
                crate::commands::MAX_ATTEMPTS_MAX
            );
        }
        if c.retry_backoff_initial_ms == 0
            || c.retry_backoff_max_ms < c.retry_backoff_initial_ms
            || c.scheduler_tick_ms == 0
        {
            bail!("commands: retry_backoff_initial_ms and scheduler_tick_ms must be at least 1, and retry_backoff_max_ms at least retry_backoff_initial_ms");
        }
        let l = &self.limits;
        if l.mqtt_keepalive_secs_max == 0
            || l.mqtt_write_stall_timeout_ms == 0
            || l.mqtt_topic_bytes_max == 0
            || l.mqtt_topic_levels_max == 0
            || l.mqtt_session_queue_bytes_max < l.mqtt_packet_size_bytes_max as usize
        {
            bail!("limits: mqtt_keepalive_secs_max, mqtt_write_stall_timeout_ms, mqtt_topic_bytes_max and mqtt_topic_levels_max must be at least 1, and mqtt_session_queue_bytes_max at least mqtt_packet_size_bytes_max");
        }
        let h = &self.http;
        if h.header_read_timeout_ms == 0 || h.request_body_timeout_ms == 0 || h.connections_max == 0
        {
            bail!("http: header_read_timeout_ms, request_body_timeout_ms and connections_max must be at least 1");
        }
        if let Some(url) = &self.store.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                bail!(
                    "[store] url must start with postgres:// (absent: the embedded SQLite store)"
                );
            }
            if self.cluster.secret_key_file.is_none() {
                bail!(
                    "[store] url needs [cluster] secret_key_file: a file every node has, with 64 hex                      digits (create one with `openssl rand -hex 32 > cluster.key; chmod 600 cluster.key`)"
                );
            }
        }
        self.events.validate()?;
        self.health.validate()?;
        self.rollouts.validate()?;
        self.rules.validate()?;
        let o = &self.ota;
        if !(1..=crate::ota::ARTIFACT_SIZE_BYTES_LIMIT).contains(&o.artifact_size_bytes_max) {
            bail!(
                "ota.artifact_size_bytes_max must be between 1 and {}",
                crate::ota::ARTIFACT_SIZE_BYTES_LIMIT
            );
        }
        if !(1..=crate::ota::ARTIFACTS_LIMIT).contains(&o.artifacts_max) {
            bail!(
                "ota.artifacts_max must be between 1 and {}",
                crate::ota::ARTIFACTS_LIMIT
            );
        }
        if o.downloads_max == 0 || o.downloads_per_device_max == 0 {
            bail!("ota.downloads_max and ota.downloads_per_device_max must be at least 1");
        }
        if !(60_000..=7 * 86_400_000).contains(&o.download_token_ttl_ms) {
            bail!("ota.download_token_ttl_ms must be between 60000 (1 min) and 604800000 (7 days)");
        }
        if !(100..=3_600_000).contains(&o.download_idle_timeout_ms) {
            bail!("ota.download_idle_timeout_ms must be between 100 and 3600000 (1 h)");
        }
        if o.download_min_rate_bytes_per_s > 1 << 30 {
            bail!("ota.download_min_rate_bytes_per_s must be at most 1073741824 (1 GiB/s; 0: no floor)");
        }
        if !(1..=crate::ota::DEPLOYMENTS_LIMIT).contains(&o.deployments_max) {
            bail!(
                "ota.deployments_max must be between 1 and {}",
                crate::ota::DEPLOYMENTS_LIMIT
            );
        }
        if !(60..=100_000).contains(&o.reports_per_minute_max) {
            bail!("ota.reports_per_minute_max must be between 60 and 100000");
        }
        if !(1000..=7 * 86_400_000).contains(&o.update_answer_timeout_ms) {
            bail!("ota.update_answer_timeout_ms must be between 1000 (1 s) and 604800000 (7 days)");
        }
        if !(100..=3_600_000).contains(&o.sweep_interval_ms) {
            bail!("ota.sweep_interval_ms must be between 100 and 3600000 (1 h)");
        }
        if !(1_000..=30 * 86_400_000).contains(&o.upload_ttl_ms) {
            bail!("ota.upload_ttl_ms must be between 1000 (1 s) and 2592000000 (30 days)");
        }
        if let Some(key) = &o.update_public_key {
            crate::ota::parse_public_key(key)
                .map_err(|e| anyhow::anyhow!("ota.update_public_key: {e}"))?;
        }
        if !(1_000..=30 * 86_400_000).contains(&self.installations.seen_within_ms) {
            bail!(
                "installations.seen_within_ms must be between 1000 (1 s) and 2592000000 (30 days)"
            );
        }
        if !(FLEET_SAMPLE_INTERVAL_MS_MIN..=86_400_000).contains(&self.fleet.sample_interval_ms) {
            bail!(
                "fleet.sample_interval_ms must be between {FLEET_SAMPLE_INTERVAL_MS_MIN} and 86400000"
            );
        }
        if self.jobs.batch_len == 0 || self.jobs.batch_len > crate::jobs::BATCH_LEN_MAX {
            bail!(
                "jobs.batch_len must be between 1 and {}",
                crate::jobs::BATCH_LEN_MAX
            );
        }
        if self.jobs.poll_interval_ms == 0 || self.jobs.batch_pause_ms > 60_000 {
            bail!("jobs.poll_interval_ms must be at least 1 and jobs.batch_pause_ms at most 60000");
        }
        crate::webhooks::validate(&self.webhooks)?;
        crate::emails::validate(&self.emails)?;
        crate::playbooks::validate(&self.playbooks, &self.parts)?;
        for name in &self.rules.alert_emails {
            if !self.emails.iter().any(|e| &e.name == name) {
                bail!("rules.alert_emails names {name:?}, which no [[email]] defines");
            }
        }
        // A notification's try ends well within its lease, so it is not taken over (and sent
        // again) while it is still running.
        let try_max_ms = self.jobs.lease_ms / 2;
        for (what, name, ms) in self
            .webhooks
            .iter()
            .map(|w| ("webhook", &w.name, w.timeout_ms))
            .chain(self.emails.iter().map(|e| ("email", &e.name, e.timeout_ms)))
        {
            if ms > try_max_ms {
                bail!("[[{what}]] {name}: timeout_ms ({ms}) must be at most half of jobs.lease_ms ({try_max_ms})");
            }
        }
        for name in &self.rules.alert_webhooks {
            if !self.webhooks.iter().any(|w| &w.name == name) {
                bail!("rules.alert_webhooks names {name:?}, which no [[webhook]] defines");
            }
        }
        if self.jobs.workers == 0 && !self.is_shared() {
            bail!("jobs.workers = 0 leaves a single node's jobs to nobody: it is for the nodes of a cluster whose jobs run on `mooring worker`s");
        }
        if self.jobs.workers > 64 {
            bail!("jobs.workers must be at most 64");
        }
        if self.jobs.lease_ms < 1_000
            || self.jobs.attempts_max == 0
            || self.jobs.retry_backoff_ms == 0
        {
            bail!("jobs.lease_ms must be at least 1000, jobs.attempts_max and jobs.retry_backoff_ms at least 1");
        }
        if !(1..=crate::reports::POINTS_PER_TURN_MAX).contains(&self.jobs.report_points_per_turn)
            || self.jobs.report_bytes_max == 0
        {
            bail!(
                "jobs.report_points_per_turn must be between 1 and {}, jobs.report_bytes_max at least 1",
                crate::reports::POINTS_PER_TURN_MAX
            );
        }
        let p = &self.provisioning;
        if p.claims_per_creator_max == 0
            || p.claims_max == 0
            || p.connections_per_claim_max == 0
            || p.connections_max == 0
            || p.requests_per_minute_max == 0
            || p.enroll_failures_per_address_max == 0
        {
            bail!("every provisioning.*_max must be at least 1");
        }
        if !(crate::provision::CLAIM_TTL_MS_MIN..=crate::provision::CLAIM_TTL_MS_MAX)
            .contains(&p.claim_ttl_max_ms)
        {
            bail!(
                "provisioning.claim_ttl_max_ms must be between {} and {}",
                crate::provision::CLAIM_TTL_MS_MIN,
                crate::provision::CLAIM_TTL_MS_MAX
            );
        }
        if self.store.pool_size == 0 {
            bail!("store.pool_size must be at least 1");
        }
        if let Some(url) = &self.bus.url {
            if !url.starts_with("nats://") {
                bail!("[bus] url must start with nats:// (absent: the in-process bus)");
            }
            if self.store.url.is_none() {
                bail!("[bus] url needs [store] url: nodes that share a bus must share a database");
            }
        }
        if self.bus.buffer_len == 0 {
            bail!("bus.buffer_len must be at least 1");
        }
        let k = &self.cluster;
        if k.heartbeat_interval_ms == 0 || k.node_lease_ms < 2 * k.heartbeat_interval_ms {
            bail!("cluster: heartbeat_interval_ms must be at least 1 and node_lease_ms at least twice heartbeat_interval_ms");
        }
        if let Some(oidc) = &self.oidc {
            oidc.validate()?;
        }
        self.policy()?;
        Ok(())
    }

    /// Whether nodes share the store (PostgreSQL): presence, the PKI and once-only work are
    /// then coordinated through it.
    pub fn is_shared(&self) -> bool {
        self.store.url.is_some()
    }

    /// The broker's bounds, from `[limits]`.
    pub fn broker(&self) -> mooring_broker::BrokerConfig {
        let l = &self.limits;
        mooring_broker::BrokerConfig {
            packet_size_bytes_max: l.mqtt_packet_size_bytes_max,
            session_queue_len_max: l.mqtt_session_queue_len_max,
            session_queue_bytes_max: l.mqtt_session_queue_bytes_max,
            write_stall_timeout_ms: l.mqtt_write_stall_timeout_ms,
            keepalive_secs_max: l.mqtt_keepalive_secs_max,
            topic_bytes_max: l.mqtt_topic_bytes_max,
            topic_levels_max: l.mqtt_topic_levels_max,
            subscriptions_per_session_max: l.mqtt_subscriptions_per_session_max,
            retained_per_principal_max: l.mqtt_retained_per_principal_max,
            retained_bytes_per_principal_max: l.mqtt_retained_bytes_per_principal_max,
            retained_messages_max: l.mqtt_retained_messages_max,
            retained_bytes_max: l.mqtt_retained_bytes_max,
            sessions_max: l.mqtt_sessions_max,
            persistent_sessions_per_principal_max: l.mqtt_persistent_sessions_per_service_max,
            sessions_per_principal_max: l.mqtt_sessions_per_service_max,
            ..mooring_broker::BrokerConfig::default()
        }
    }

    /// The topic policy: defaults plus the configured rules.
    pub fn policy(&self) -> anyhow::Result<Policy> {
        Policy::with_rules(self.policy.rules.clone()).context("invalid [policy] rules")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_file_and_rejects_unknown_keys() {
        let c: ServerConfig = toml::from_str(
            r#"
            data_dir = "/tmp/x"
            mqtt_addr = "127.0.0.1:9883"
            server_names = ["mqtt.example.com"]
            [telemetry]
            retention_days = 7
            [[policy.rules]]
            principal = "device"
            action = "subscribe"
            filter = "sites/{tag:site}/#"
            "#,
        )
        .expect("valid config");
        assert_eq!(c.telemetry.retention_days, 7);
        assert_eq!(c.policy.rules.len(), 1);
        c.validate().expect("valid");
        assert!(toml::from_str::<ServerConfig>("nope = 1").is_err());
    }

    #[test]
    fn certificates_expiring_warn_days_is_validated() {
        let with = |days: &str| -> anyhow::Result<ServerConfig> {
            let c: ServerConfig =
                toml::from_str(&format!("[certificates]\nexpiring_warn_days = {days}\n"))?;
            c.validate()?;
            Ok(c)
        };
        assert_eq!(ServerConfig::default().certificates.expiring_warn_days, 30);
        assert_eq!(
            with("90").expect("valid").certificates.expiring_warn_days,
            90
        );
        for bad in ["0", "3651"] {
            let e = format!("{:#}", with(bad).expect_err(bad));
            assert!(e.contains("certificates.expiring_warn_days"), "{e}");
        }
    }

    #[test]
    fn dev_listener_must_be_loopback() {
        let c = ServerConfig {
            mqtt_dev_addr: Some("0.0.0.0:1884".parse().expect("addr")),
            ..ServerConfig::default()
        };
        assert!(c.validate().is_err());
    }

    fn oidc(extra: &str) -> anyhow::Result<()> {
        let text = format!(
            "[oidc]\nissuer = \"https://id.example.com/realms/fleet\"\nclient_id = \"mooring\"\n\
             redirect_url = \"https://mooring.example.com/api/v1/auth/oidc/callback\"\n{extra}"
        );
        let c: ServerConfig = toml::from_str(&text)?;
        c.validate()
    }

    #[test]
    fn oidc_table_is_validated_with_clear_messages() {
        oidc("role_map = { fleet-admins = \"admin\", ops = \"operator\" }").expect("valid");
        oidc("default_role = \"viewer\"").expect("valid");
        let refused = |extra: &str, needle: &str| {
            let e = format!("{:#}", oidc(extra).expect_err(extra));
            assert!(e.contains(needle), "{extra}: {e}");
        };
        refused("", "role_map");
        refused("role_map = { ops = \"root\" }", "unknown role \"root\"");
        refused("default_role = \"god\"", "unknown role \"god\"");
        refused(
            "default_role = \"viewer\"\nclient_secret = \"hunter2\"",
            "client_secret_file",
        );
        refused(
            "default_role = \"viewer\"\nscopes = [\"email\"]",
            "\"openid\"",
        );
        let http = "[oidc]\nissuer = \"http://id.example.com\"\nclient_id = \"m\"\n\
                    redirect_url = \"https://m.example.com/cb\"\ndefault_role = \"viewer\"";
        let e = format!(
            "{:#}",
            toml::from_str::<ServerConfig>(http)
                .expect("parse")
                .validate()
                .expect_err("http issuer")
        );
        assert!(e.contains("oidc.issuer") && e.contains("https://"), "{e}");
        let bad_url = http.replace("http://id.example.com", "not a url");
        let e = format!(
            "{:#}",
            toml::from_str::<ServerConfig>(&bad_url)
                .expect("parse")
                .validate()
                .expect_err("bad url")
        );
        assert!(e.contains("is not a URL"), "{e}");
        // The inline secret is never printed.
        let c: ServerConfig =
            toml::from_str(&format!("{http}\nclient_secret = \"hunter2\"")).expect("parse");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
