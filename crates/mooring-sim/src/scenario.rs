//! The scenario file: what fleet to simulate, what happens when, and what must hold at the end.
//!
//! ```toml
//! name = "smoke"
//! seed = 42
//! duration = "1h"
//!
//! [[cohort]]
//! name = "locks"
//! count = 1000
//! tags = { site = "berlin", hw = "rev-b" }
//! region = "eu"
//! telemetry_interval = "60s"
//!
//! [[event]]
//! at = "20m"
//! action = "cut_link"
//! region = "eu"
//! duration = "10m"
//!
//! [expect]
//! lost_acked_telemetry = 0
//! ```

use anyhow::{bail, Context};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::path::Path;

/// Most devices one scenario may simulate.
pub const DEVICES_MAX: usize = 1_000_000;
/// Most samples in the report's time series.
pub const SAMPLES_MAX: u64 = 100_000;
/// Most telemetry messages one run may generate (the simulator remembers each acked one).
pub const MESSAGES_MAX: u64 = 200_000_000;
/// Longest simulated duration.
pub const DURATION_MS_MAX: u64 = 30 * 86_400_000;

/// A duration written as `500ms`, `30s`, `10m`, `2h` or `1d`, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct DurationMs(pub u64);

impl DurationMs {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration {s:?} needs a unit (ms, s, m, h, d)"))?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration {s:?} must start with a whole number"))?;
        let factor = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => {
                return Err(format!(
                    "duration {s:?}: unknown unit {other:?} (ms, s, m, h, d)"
                ))
            }
        };
        n.checked_mul(factor)
            .map(DurationMs)
            .ok_or_else(|| format!("duration {s:?} is too large"))
    }

    pub fn as_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }
}

impl<'de> Deserialize<'de> for DurationMs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DurationMs::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The whole scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Same seed, same run.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Simulated time to run.
    pub duration: DurationMs,
    /// Interval of the report's time series (online devices, telemetry rate, command states).
    #[serde(default = "default_sample_interval")]
    pub sample_interval: DurationMs,
    #[serde(default)]
    pub server: ServerTarget,
    /// The server's `[jobs] batch_pause_ms` (virtual time; default none): a pause after each
    /// batch of a bulk job, so a job spans simulated time and a restart can fall inside it.
    #[serde(default)]
    pub job_batch_pause: DurationMs,
    /// The server's `[jobs] report_points_per_turn` (default: the server's, 10,000): smaller
    /// makes a `report_job` take more turns.
    #[serde(default)]
    pub job_report_points_per_turn: Option<usize>,
    #[serde(rename = "cohort")]
    pub cohorts: Vec<Cohort>,
    /// Firmware the run uploads before the devices boot (`ota_deploy` events deploy it).
    #[serde(default, rename = "artifact")]
    pub artifacts: Vec<Artifact>,
    #[serde(default, rename = "event")]
    pub events: Vec<Event>,
    /// The server's `[health]` table (docs/health.md), as in its config file.
    #[serde(default)]
    pub health: Option<mooring_server::health::HealthConfig>,
    /// The server's `[rollouts]` table (docs/ota.md#rollouts), e.g. `tick_ms`.
    #[serde(default)]
    pub rollouts: Option<mooring_server::rollouts::RolloutsConfig>,
    /// Rules the run creates before the devices boot (docs/health.md "Rules").
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleSpec>,
    /// The server's `[[playbook]]`s (docs/health.md#playbooks), as in its config file.
    #[serde(default, rename = "playbook")]
    pub playbooks: Vec<mooring_server::playbooks::PlaybookConfig>,
    /// The server's `[[part]]` table.
    #[serde(default, rename = "part")]
    pub parts: Vec<mooring_server::playbooks::PartConfig>,
    #[serde(default)]
    pub expect: Expect,
}

/// `[[rule]]`: a rule created as `POST /api/v1/rules` makes it, by an admin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    pub when: String,
    #[serde(default)]
    pub selector: Option<String>,
    pub then: String,
}

/// `[[artifact]]`: a firmware image the run makes (deterministic bytes from the seed and the
/// version), uploads through the server's OTA service and has it sign with the fleet's update
/// key, before any device boots.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub version: String,
    /// Size of the image in bytes (1 to [`ARTIFACT_BYTES_MAX`]); every device holds up to
    /// three copies (two slots and the download), so keep it small at fleet scale.
    pub size_bytes: u64,
    /// Hardware revisions it is built for (the cohorts' `[cohort.ota] hw_revision`).
    pub compatible: Vec<String>,
}

/// Largest `[[artifact]] size_bytes`.
pub const ARTIFACT_BYTES_MAX: u64 = 16 * 1024 * 1024;

fn default_seed() -> u64 {
    1
}

fn default_sample_interval() -> DurationMs {
    DurationMs(60_000)
}

/// Where the server is.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "kebab-case")]
pub enum ServerTarget {
    /// A real `mooring` server started inside the simulator, on virtual time (default).
    #[default]
    InProcess,
    /// `nodes` real `mooring` server nodes started inside the simulator as one cluster, on
    /// virtual time: one shared store (SQLite) and one in-process bus, each node with its own
    /// broker, services, heartbeats and leases. Devices are spread over the live nodes.
    Cluster {
        /// How many nodes (`node = 1` .. `nodes` in events), 2 to [`CLUSTER_NODES_MAX`].
        nodes: usize,
        /// How often each node records that it is alive (the server's
        /// `[cluster] heartbeat_interval_ms`; virtual time).
        #[serde(default = "default_heartbeat_interval")]
        heartbeat_interval: DurationMs,
        /// A node not heard from for this long is dead: its devices are offline and its leases
        /// move (the server's `[cluster] node_lease_ms`; virtual time).
        #[serde(default = "default_node_lease")]
        node_lease: DurationMs,
    },
    /// A running server reached over MQTT/TLS, in real time; devices are registered and the
    /// run is measured through its HTTP API (see [`crate::remote`]).
    Remote {
        /// MQTT/TLS address, `host:port`.
        mqtt: String,
        /// API base URL, e.g. `http://127.0.0.1:8080`.
        api: String,
        /// File holding an admin token.
        token_file: String,
    },
}

/// Most nodes of an in-process cluster.
pub const CLUSTER_NODES_MAX: usize = 16;

fn default_heartbeat_interval() -> DurationMs {
    DurationMs(1_000)
}

fn default_node_lease() -> DurationMs {
    DurationMs(5_000)
}

impl ServerTarget {
    /// Cluster mode: how many nodes; else `None`.
    pub fn cluster_nodes(&self) -> Option<usize> {
        match self {
            ServerTarget::Cluster { nodes, .. } => Some(*nodes),
            _ => None,
        }
    }
}

/// The counters of a cluster node (`mooring_cluster_<name>_total`) that `[expect]
/// max_cluster_counters` may bound.
pub const CLUSTER_COUNTERS: [&str; 7] = [
    "bus_sent",
    "bus_received",
    "bus_dropped",
    "bus_rejected",
    "outbox_dropped",
    "takeovers",
    "reaped_sessions",
];

/// A group of devices sharing one device model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cohort {
    pub name: String,
    pub count: usize,
    /// Device ids are `<id_prefix><n>`; default `<name>-`.
    pub id_prefix: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Region label for link events (`cut_link region = "eu"`).
    #[serde(default)]
    pub region: String,
    /// Firmware version the devices report.
    #[serde(default = "default_version")]
    pub version: String,
    /// How often a device sends a telemetry message.
    #[serde(default = "default_telemetry_interval")]
    pub telemetry_interval: DurationMs,
    /// Metrics in each message, by name.
    #[serde(default = "default_metrics")]
    pub metrics: BTreeMap<String, MetricModel>,
    #[serde(default)]
    pub battery: Option<Battery>,
    #[serde(default)]
    pub link: Link,
    /// Expected power losses per device per day (the device restarts; unsynced state is lost).
    #[serde(default)]
    pub power_loss_per_day: f64,
    /// Offset of the device's clock from true time.
    #[serde(default)]
    pub clock_skew_ms: i64,
    /// Probability that one flash write fails.
    #[serde(default)]
    pub flash_write_failure_rate: f64,
    /// Expected firmware crashes per device per day (the agent process restarts).
    #[serde(default)]
    pub crash_per_day: f64,
    /// Probability that a command handler panics (supervision must keep telemetry flowing).
    #[serde(default)]
    pub command_panic_rate: f64,
    /// Spread the devices' first connection over this long.
    #[serde(default = "default_connect_spread")]
    pub connect_spread: DurationMs,
    /// MQTT keep-alive of the agents (at least 5 s). A PINGREQ goes out after this long without
    /// traffic, so a short keep-alive costs CPU at scale.
    #[serde(default = "default_keepalive")]
    pub keepalive: DurationMs,
    /// Outbox bound of each agent, in messages (the oldest are dropped when full).
    #[serde(default = "default_outbox_max")]
    pub outbox_max: u64,
    /// Writes the flash acknowledges before they are synced (0 = an honest flash). A power loss
    /// undoes them; with more than 0 the agent's delivery guarantees no longer hold (this models
    /// broken hardware, to show what the simulator finds).
    #[serde(default)]
    pub flash_unsynced_writes: usize,
    /// How long a device takes to boot after a power loss, crash or empty battery.
    #[serde(default = "default_boot_delay")]
    pub boot_delay: DurationMs,
    /// Devices start unenrolled and enroll with a claim (the agent's real `enroll`) instead of
    /// being registered up front.
    #[serde(default)]
    pub enroll: Option<Enroll>,
    /// The devices run the agent's A/B updater (issue 17) on in-memory slots.
    #[serde(default)]
    pub ota: Option<CohortOta>,
    /// Every device of the cohort is a gateway (the agent's gateway mode, issue 20) with
    /// `children` children attached to it.
    #[serde(default)]
    pub gateway: Option<CohortGateway>,
}

/// `[cohort.gateway]`: each device of the cohort runs the agent in gateway mode. Before the
/// fleet boots, the harness registers `<gateway id>-c<k>` (k = 0..children) and attaches each
/// to its gateway on the server. The agent gets an in-memory [`ChildTransport`] instead of
/// its Unix socket: every child says hello when the agent starts, then sends
/// `{"seq": n, "sim.n": n, "sim.child": k}` every `child_telemetry_interval` with its own
/// counter `n` (1, 2, 3, ... kept across gateway restarts). One task per gateway drives all
/// its children.
///
/// [`ChildTransport`]: mooring_agent::gateway::ChildTransport
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortGateway {
    /// Children per gateway.
    pub children: usize,
    /// How often each child sends telemetry.
    #[serde(default = "default_child_telemetry_interval")]
    pub child_telemetry_interval: DurationMs,
}

/// Most children one simulated gateway may have.
pub const CHILDREN_PER_GATEWAY_MAX: usize = 1_000;

fn default_child_telemetry_interval() -> DurationMs {
    DurationMs(300_000)
}

/// `[cohort.ota]`: the cohort's devices run the agent's real updater (`mooring.update`,
/// journal, resumable download, verify, install, trial boot, health check, commit or revert)
/// on in-memory slots that survive power losses, booting from slot A with the cohort's
/// `version`. Downloads go through the in-process server's HTTP router (the real download
/// handler: token, `Range`, `[ota] downloads_max`) over the device's simulated link, at
/// `download_bytes_per_s`; a link cut breaks a download in flight, which resumes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortOta {
    /// The devices' hardware revision (matched against an artifact's `compatible`).
    #[serde(default = "default_hw_revision")]
    pub hw_revision: String,
    /// Versions whose trial boot fails its health check on this cohort (a bad build): the
    /// device must roll back to the version it ran and say so.
    #[serde(default)]
    pub fails_health: Vec<String>,
    /// Download speed of each device.
    #[serde(default = "default_download_bytes_per_s")]
    pub download_bytes_per_s: u64,
    /// The updater's `battery_min_pct` (with a `[cohort.battery]` model: an update waits,
    /// reported `deferred`, while the battery is below it).
    #[serde(default = "default_ota_battery_min_pct")]
    pub battery_min_pct: u8,
    /// The updater's `health_deadline_secs`.
    #[serde(default = "default_health_deadline")]
    pub health_deadline: DurationMs,
    /// Probability that a device loses power once during its update, at a time drawn within
    /// `power_loss_within` of the start of its first download: mid-download, while rebooting,
    /// during the trial boot, ... (the report counts the hits by the phase they interrupted; a
    /// time after the update finished does nothing).
    #[serde(default)]
    pub power_loss_rate: f64,
    #[serde(default = "default_power_loss_within")]
    pub power_loss_within: DurationMs,
    /// Link faults that replace the cohort's `[cohort.link]` ones while the device's committed
    /// version is the key: a version that makes the link worse on this hardware, e.g.
    /// `{ "1.1.0" = { drops_per_day = 200 } }`. Checked every [`LINK_BY_VERSION_CHECK_MS`]
    /// (and at every boot), so it takes effect within that of the commit.
    #[serde(default)]
    pub link_by_version: BTreeMap<String, VersionLink>,
}

/// How often a device whose cohort has `[cohort.ota] link_by_version` looks at the version it
/// committed (simulated ms).
pub const LINK_BY_VERSION_CHECK_MS: u64 = 30_000;

/// `[cohort.ota] link_by_version` entry: each given field replaces the `[cohort.link]` field of
/// the same name while the device runs the version committed; the others stay the cohort's.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionLink {
    /// Expected spontaneous connection drops per device per day.
    pub drops_per_day: Option<f64>,
    /// Expected outages per device per day.
    pub outages_per_day: Option<f64>,
    pub outage_duration: Option<DurationMs>,
}

fn default_hw_revision() -> String {
    "rev-a".into()
}

fn default_download_bytes_per_s() -> u64 {
    16 * 1024
}

fn default_ota_battery_min_pct() -> u8 {
    30
}

fn default_health_deadline() -> DurationMs {
    DurationMs(120_000)
}

fn default_power_loss_within() -> DurationMs {
    DurationMs(300_000)
}

/// A cohort whose devices enroll with claims (issue 16): the harness creates
/// `ceil(count / claim_uses)` claims through the server's provisioning service; device `n`
/// uses claim `n / claim_uses`, proposes its id, and runs the agent's `enroll` (key, request,
/// certificate) and then the normal agent with the certificate it received.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enroll {
    /// Uses of each claim (devices per claim token), 1 to 1,000,000.
    #[serde(default = "default_claim_uses")]
    pub claim_uses: u32,
    /// Probability, for each point of the pipeline independently, that the device's link drops
    /// (or its process is killed) there once: before the request, after the request before the
    /// reply, after the reply before the certificate is stored (a process kill; the agent
    /// resumes from its state dir), before the first connect with the certificate.
    #[serde(default)]
    pub fault_rate: f64,
    /// How long the link stays down when it drops before the first connect with the
    /// certificate (at most; each device draws a time up to this).
    #[serde(default = "default_enroll_outage")]
    pub first_connect_outage: DurationMs,
}

fn default_claim_uses() -> u32 {
    1
}

fn default_enroll_outage() -> DurationMs {
    DurationMs(30_000)
}

fn default_keepalive() -> DurationMs {
    DurationMs(60_000)
}

fn default_outbox_max() -> u64 {
    1_000
}

fn default_boot_delay() -> DurationMs {
    DurationMs(5_000)
}

fn default_version() -> String {
    "1.0.0".into()
}

fn default_telemetry_interval() -> DurationMs {
    DurationMs(60_000)
}

fn default_connect_spread() -> DurationMs {
    DurationMs(60_000)
}

fn default_metrics() -> BTreeMap<String, MetricModel> {
    let mut m = BTreeMap::new();
    m.insert(
        "temp".to_owned(),
        MetricModel::Gauge {
            mean: 21.0,
            jitter: 2.0,
        },
    );
    m
}

/// How one metric's values are generated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum MetricModel {
    /// `mean ± jitter`, uniform.
    Gauge { mean: f64, jitter: f64 },
    /// Increases by `per_message` each message.
    Counter { per_message: f64 },
    /// True with probability `rate`.
    Flag { rate: f64 },
}

/// Battery: reported as `battery.pct`; a device whose battery is empty goes offline until
/// charged above 5 %.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Battery {
    #[serde(default = "default_battery_start")]
    pub start_pct: f64,
    /// Percent per simulated hour while running.
    pub drain_pct_per_hour: f64,
    /// Percent per simulated hour (e.g. solar); 0 for none.
    #[serde(default)]
    pub charge_pct_per_hour: f64,
}

fn default_battery_start() -> f64 {
    100.0
}

/// Link quality of a cohort.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// One-way latency added to every delivery.
    #[serde(default)]
    pub latency_ms: u64,
    /// Expected spontaneous connection drops per device per day.
    #[serde(default)]
    pub drops_per_day: f64,
    /// Expected outages per device per day (no connectivity for `outage_duration`).
    #[serde(default)]
    pub outages_per_day: f64,
    #[serde(default)]
    pub outage_duration: DurationMs,
}

/// Something that happens at a simulated time. (Unknown keys are refused by [`Action`].)
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub at: DurationMs,
    #[serde(flatten)]
    pub action: Action,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Send a command to the devices matching `to` (a selector: ids, `tag:k=v`, `online`, `and`).
    Command {
        to: String,
        name: String,
        #[serde(default)]
        params: serde_json::Value,
        #[serde(default)]
        ttl: Option<DurationMs>,
    },
    /// Cut the link of every device in `region` (or every device if empty) for `duration`.
    CutLink {
        #[serde(default)]
        region: String,
        duration: DurationMs,
    },
    /// Delete a device from the registry (its session must be closed, its certificate refused).
    DeleteDevice { device: String },
    /// Replace the tags of every device matching `to` (a selector) with `tags`, through the
    /// server's registry: the broker re-checks the devices' sessions against the new tags at
    /// once, and later selectors see the new tags.
    Retag {
        to: String,
        tags: BTreeMap<String, String>,
    },
    /// A bulk tag job (`POST /api/v1/jobs`, action `tag`) on the devices matching `to`: sets
    /// `tags`, keeps the others, in the background with its progress stored per batch (a
    /// restart resumes it).
    TagJob {
        to: String,
        tags: BTreeMap<String, String>,
    },
    /// A telemetry report (`POST /api/v1/reports`, CSV) of the devices matching `to`: their
    /// points timestamped from `since` to `until` (simulated time from the start; `until` at
    /// most the event's time), made in the background as a job. At the end the simulator reads
    /// the file and checks that it holds every stored point of the selection in that range
    /// exactly once (`max_jobs_not_succeeded`).
    ReportJob {
        to: String,
        since: DurationMs,
        until: DurationMs,
        #[serde(default)]
        metrics: Vec<String>,
    },
    /// Restart the in-process server (stop, then start on the same data dir).
    RestartServer {
        #[serde(default)]
        downtime: DurationMs,
    },
    /// Cluster mode: kill node `node` (1-based) as `kill -9` would: no graceful shutdown, its
    /// connections dropped, its tasks gone; its devices reconnect to the other nodes.
    KillNode { node: usize },
    /// Cluster mode: start a killed node again, with the same node id, on the shared store.
    RestartNode { node: usize },
    /// Deploy the `[[artifact]]` of `version` to the devices matching `to` (a selector) through
    /// the server's OTA service: one `mooring.update` command per device, tracked per device
    /// from its reports (`POST /api/v1/ota/deployments`).
    OtaDeploy {
        version: String,
        to: String,
        #[serde(default)]
        allow_downgrade: bool,
    },
    /// A staged rollout of the `[[artifact]]` of `version` to the devices matching `to`
    /// (docs/ota.md#rollouts), created through the server's rollouts service
    /// (`POST /api/v1/rollouts`); the server's controller runs it from there.
    Rollout(Box<Rollout>),
}

/// `action = "rollout"`: what `POST /api/v1/rollouts` takes, with the artifact named by its
/// `[[artifact]]` version, the target by `to` (or `selector`) and the health window as a
/// duration. Unset fields take the server's defaults; `seed` defaults to the scenario's, so
/// the waves repeat with the run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub version: String,
    #[serde(alias = "selector")]
    pub to: String,
    /// Cumulative shares of the target in percent, the last 100 (default 1, 10, 50, 100).
    pub waves: Option<Vec<f64>>,
    /// The control cohort's share in percent (default 5).
    pub control_pct: Option<f64>,
    /// How long each gate watches the updated devices against the control (default 30m).
    pub health_window: Option<DurationMs>,
    /// Devices each side of the gate needs, and that must have tried before the abort
    /// threshold counts (default 20).
    pub min_devices: Option<u64>,
    /// Abort when more than this share (percent) of the devices that tried failed (default 5).
    pub abort_failure_rate_pct: Option<f64>,
    pub max_per_minute: Option<u32>,
    pub max_concurrent: Option<u32>,
    /// The gate's signals (default disconnects, crashes, restarts, telemetry_gaps).
    pub gate: Option<Vec<String>>,
    /// Per-device preconditions, e.g. `["battery>=30"]`.
    #[serde(default)]
    pub require: Vec<String>,
    /// A maintenance window in the device's local time, e.g. `"02:00-05:00"`.
    pub window: Option<String>,
    #[serde(default)]
    pub auto_abort: bool,
    #[serde(default)]
    pub allow_downgrade: bool,
    /// The seed of the waves' random order (default: the scenario's seed).
    pub seed: Option<u64>,
}

impl Rollout {
    /// The API's request for this rollout of artifact `artifact_id`.
    pub fn request(&self, artifact_id: &str, scenario_seed: u64) -> mooring_api::CreateRollout {
        mooring_api::CreateRollout {
            artifact_id: artifact_id.to_owned(),
            selector: self.to.clone(),
            waves: self.waves.clone(),
            control_pct: self.control_pct,
            max_per_minute: self.max_per_minute,
            max_concurrent: self.max_concurrent,
            abort_failure_rate_pct: self.abort_failure_rate_pct,
            min_devices: self.min_devices,
            health_window_ms: self.health_window.map(|d| d.0),
            gate: self.gate.clone(),
            require: self.require.clone(),
            window: self.window.clone(),
            auto_abort: self.auto_abort,
            allow_downgrade: self.allow_downgrade,
            seed: Some(self.seed.unwrap_or(scenario_seed)),
        }
    }
}

impl Action {
    /// The action's name as written in a scenario file (`action = "cut_link"`).
    pub fn name(&self) -> &'static str {
        match self {
            Action::Command { .. } => "command",
            Action::CutLink { .. } => "cut_link",
            Action::DeleteDevice { .. } => "delete_device",
            Action::Retag { .. } => "retag",
            Action::TagJob { .. } => "tag_job",
            Action::ReportJob { .. } => "report_job",
            Action::RestartServer { .. } => "restart_server",
            Action::KillNode { .. } => "kill_node",
            Action::RestartNode { .. } => "restart_node",
            Action::OtaDeploy { .. } => "ota_deploy",
            Action::Rollout(_) => "rollout",
        }
    }
}

/// Assertions checked at the end; `mooring sim run` exits non-zero if one fails.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Telemetry messages acknowledged to an agent but missing from the store.
    pub lost_acked_telemetry: Option<u64>,
    /// Commands whose handler ran more than once on a device.
    pub commands_executed_twice: Option<u64>,
    /// Fewest devices online at the end.
    pub min_online_at_end: Option<usize>,
    /// Fewest telemetry messages stored.
    pub min_telemetry_stored: Option<u64>,
    /// Fewest commands that reached `succeeded`.
    pub min_commands_succeeded: Option<u64>,
    /// Most commands that ended `failed` or are still not final.
    pub max_commands_not_succeeded: Option<u64>,
    /// Most `tag_job` and `report_job` jobs that did not succeed on every device they counted
    /// (not finished, failed, canceled, a device failed, or `done` differs from `total`; a
    /// report's file missing a stored point of its range or holding one twice) by the end.
    pub max_jobs_not_succeeded: Option<u64>,
    /// Most MQTT refusals per reason (`mooring_mqtt_refusals_total{reason}` of the server as it
    /// is at the end, i.e. since its last restart), e.g. `{ session_quota = 0, write_stalled = 0 }`:
    /// a well-behaved fleet under faults must never hit a broker bound.
    #[serde(default)]
    pub max_mqtt_refusals: BTreeMap<String, u64>,
    /// Longest time any device cut off by a `cut_link`, `restart_server` or `kill_node` event
    /// may take to be accepted again after the event ended (the link back, the server up, the
    /// node killed); a device that never came back fails it too.
    pub max_reconnect_time: Option<DurationMs>,
    /// Cluster mode: most of each counter summed over the nodes and over every run of each
    /// node (`mooring_cluster_<name>_total`, one of [`CLUSTER_COUNTERS`]), e.g.
    /// `{ bus_dropped = 0, outbox_dropped = 0 }`: no notice may be lost under load.
    #[serde(default)]
    pub max_cluster_counters: BTreeMap<String, u64>,
    /// Gateway cohorts: most child telemetry messages handed to a gateway that are neither
    /// in the server's store nor still in the gateway's outbox at the end.
    pub children_telemetry_lost: Option<u64>,
    /// Gateway cohorts: most children whose stored telemetry is not exactly once and in
    /// order (oldest first, the child's seqs must read 1, 2, 3, ... without a gap or repeat).
    pub children_out_of_order: Option<u64>,
    /// Gateway cohorts: fewest gateways online at the end (`min_online_at_end` counts the
    /// children the gateways announce too).
    pub min_gateways_online_at_end: Option<u64>,
    /// Enrolling cohorts: every device ended enrolled exactly once (registered with the very
    /// certificate it stored, each claim's uses equal to its enrolled devices, no device in the
    /// store beyond the cohorts).
    pub enrolled_exactly_once: Option<bool>,
    /// Enrolling cohorts: most devices with more than one active certificate in the ledger.
    pub max_duplicate_certificates: Option<u64>,
    /// OTA: most devices whose slots would not boot a whole, verified image at the end (the
    /// slot the bootloader picks holds no image, a partial one, or bytes of no known version).
    pub max_ota_unbootable: Option<u64>,
    /// OTA: most devices whose final state the server shows is not what the device is (the
    /// server says committed and the device does not run that version committed, or the
    /// device has nothing left to report and the server shows another state).
    pub max_ota_untruthful: Option<u64>,
    /// OTA: most devices with a status report still in their outbox at the end (whose newest
    /// state may not have reached the server).
    pub max_ota_unsettled: Option<u64>,
    /// OTA: fewest devices that committed the deployed version.
    pub min_ota_committed: Option<u64>,
    /// OTA: fewest devices that rolled back (a cohort whose `fails_health` names the version).
    pub min_ota_rolled_back: Option<u64>,
    /// Fleet health: exactly these cohort alerts were raised (any state at the end), each
    /// named `<cohort>: <signal>`, e.g. `["site=c: disconnects"]`; `[]`: none.
    pub cohort_alerts: Option<Vec<String>>,
    /// Fleet health: per rule name, the devices that got an alert from it are exactly those
    /// the selector matches, e.g. `{ fast-drain = "tag:drain=fast" }`.
    #[serde(default)]
    pub rule_alerts: BTreeMap<String, String>,
    /// Fleet health: the first alert of each (a cohort alert `<cohort>: <signal>` or a rule
    /// name) was raised at most this far into the run.
    #[serde(default)]
    pub max_detection: BTreeMap<String, DurationMs>,
    /// Playbooks: per playbook name, it opened exactly one ticket, every device it lists is
    /// one the selector names, and its cohort is exactly those devices, e.g.
    /// `{ link-visit = "tag:site=c" }`.
    #[serde(default)]
    pub tickets: BTreeMap<String, String>,
    /// Rollouts, by the `[[artifact]]` version of their `rollout` event (every rollout event of
    /// that version must meet it), e.g. `{ "1.1.0" = { state = "completed" } }`.
    #[serde(default)]
    pub rollouts: BTreeMap<String, RolloutExpect>,
}

/// `[expect] rollouts.<version>`: how a rollout must stand at the end.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutExpect {
    /// Its state at the end: `running`, `paused`, `aborted` or `completed`.
    pub state: Option<String>,
    /// At most this many of its waves started (the control cohort's update not counted).
    pub waves_started_max: Option<u32>,
    /// Per cohort name: at most this share (0..1) of the cohort's devices got the update from
    /// the rollout (its update was started on them, whatever came of it).
    #[serde(default)]
    pub cohort_updated_share_max: BTreeMap<String, f64>,
}

/// The states a rollout can be in.
pub const ROLLOUT_STATES: [&str; 4] = ["running", "paused", "aborted", "completed"];

impl Scenario {
    pub fn load(path: &Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        let s: Scenario = toml::from_str(&text)
            .with_context(|| format!("parsing scenario {}", path.display()))?;
        s.validate()
            .with_context(|| format!("invalid scenario {}", path.display()))?;
        Ok(s)
    }

    pub fn device_count(&self) -> usize {
        self.cohorts.iter().map(|c| c.count).sum()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.cohorts.is_empty() {
            bail!("a scenario needs at least one [[cohort]]");
        }
        mooring_server::playbooks::validate(&self.playbooks, &self.parts)?;
        for name in self.expect.tickets.keys() {
            if !self.playbooks.iter().any(|p| &p.name == name) {
                bail!("expect.tickets names {name:?}, which no [[playbook]] defines");
            }
        }
        let n = self.device_count();
        if n == 0 || n > DEVICES_MAX {
            bail!("the cohorts hold {n} devices; between 1 and {DEVICES_MAX} are allowed");
        }
        if self.duration.0 == 0 || self.duration.0 > DURATION_MS_MAX {
            bail!("duration must be between 1ms and 30d");
        }
        if self.sample_interval.0 == 0 {
            bail!("sample_interval must be positive");
        }
        if self.duration.0 / self.sample_interval.0 > SAMPLES_MAX {
            bail!("duration / sample_interval is more than {SAMPLES_MAX} samples");
        }
        let messages: u64 = self
            .cohorts
            .iter()
            .map(|c| {
                let children = c.gateway.as_ref().map_or(0, |g| {
                    (g.children as u64)
                        .saturating_mul(self.duration.0 / g.child_telemetry_interval.0.max(1))
                });
                (c.count as u64).saturating_mul(
                    (self.duration.0 / c.telemetry_interval.0.max(1)).saturating_add(children),
                )
            })
            .sum();
        if messages > MESSAGES_MAX {
            bail!("the cohorts would send about {messages} messages; at most {MESSAGES_MAX} are allowed");
        }
        let children_expected = self.expect.children_telemetry_lost.is_some()
            || self.expect.children_out_of_order.is_some()
            || self.expect.min_gateways_online_at_end.is_some();
        if children_expected && self.cohorts.iter().all(|c| c.gateway.is_none()) {
            bail!("expect.children_* and min_gateways_online_at_end need a cohort with [cohort.gateway]");
        }
        let mut names = std::collections::BTreeSet::new();
        for c in &self.cohorts {
            if !names.insert(c.name.as_str()) {
                bail!("cohort name {:?} is used twice", c.name);
            }
            if c.telemetry_interval.0 == 0 {
                bail!("cohort {}: telemetry_interval must be positive", c.name);
            }
            if c.keepalive.0 < 5_000 || c.keepalive.0 > 65_535_000 {
                bail!("cohort {}: keepalive must be between 5s and 65535s", c.name);
            }
            if c.outbox_max == 0 {
                bail!("cohort {}: outbox_max must be at least 1", c.name);
            }
            if c.flash_unsynced_writes > mooring_agent::store::UNSYNCED_OPS_MAX {
                bail!(
                    "cohort {}: flash_unsynced_writes must be at most {}",
                    c.name,
                    mooring_agent::store::UNSYNCED_OPS_MAX
                );
            }
            if let Some(b) = &c.battery {
                for (what, v) in [
                    ("battery.start_pct", b.start_pct),
                    ("battery.drain_pct_per_hour", b.drain_pct_per_hour),
                    ("battery.charge_pct_per_hour", b.charge_pct_per_hour),
                ] {
                    if !(v >= 0.0 && v.is_finite()) {
                        bail!("cohort {}: {what} must be a non-negative number", c.name);
                    }
                }
                if b.start_pct > 100.0 {
                    bail!("cohort {}: battery.start_pct must be at most 100", c.name);
                }
            }
            for (metric, m) in &c.metrics {
                if metric == SEQ_METRIC
                    || metric == "battery.pct"
                    || metric == "seq"
                    || metric == "ts"
                {
                    bail!("cohort {}: metric name {metric:?} is reserved", c.name);
                }
                let ok = match m {
                    MetricModel::Gauge { mean, jitter } => {
                        mean.is_finite() && *jitter >= 0.0 && jitter.is_finite()
                    }
                    MetricModel::Counter { per_message } => per_message.is_finite(),
                    MetricModel::Flag { rate } => (0.0..=1.0).contains(rate),
                };
                if !ok {
                    bail!(
                        "cohort {}: metric {metric:?} has invalid parameters",
                        c.name
                    );
                }
            }
            for (what, p) in [
                ("flash_write_failure_rate", c.flash_write_failure_rate),
                ("command_panic_rate", c.command_panic_rate),
            ] {
                if !(0.0..=1.0).contains(&p) {
                    bail!("cohort {}: {what} must be between 0 and 1", c.name);
                }
            }
            for (what, r) in [
                ("power_loss_per_day", c.power_loss_per_day),
                ("crash_per_day", c.crash_per_day),
                ("link.drops_per_day", c.link.drops_per_day),
                ("link.outages_per_day", c.link.outages_per_day),
            ] {
                if !(r >= 0.0 && r.is_finite()) {
                    bail!("cohort {}: {what} must be a non-negative number", c.name);
                }
            }
            if let Some(g) = &c.gateway {
                if g.children == 0 || g.children > CHILDREN_PER_GATEWAY_MAX {
                    bail!(
                        "cohort {}: gateway.children must be between 1 and {CHILDREN_PER_GATEWAY_MAX}",
                        c.name
                    );
                }
                if g.child_telemetry_interval.0 == 0 {
                    bail!(
                        "cohort {}: gateway.child_telemetry_interval must be positive",
                        c.name
                    );
                }
                if c.enroll.is_some() {
                    bail!("cohort {}: a gateway cohort cannot enroll", c.name);
                }
            }
            if let Some(e) = &c.enroll {
                if e.claim_uses == 0 || e.claim_uses > 1_000_000 {
                    bail!(
                        "cohort {}: enroll.claim_uses must be between 1 and 1000000",
                        c.name
                    );
                }
                if !(0.0..=1.0).contains(&e.fault_rate) {
                    bail!(
                        "cohort {}: enroll.fault_rate must be between 0 and 1",
                        c.name
                    );
                }
            }
            if let Some(o) = &c.ota {
                if !mooring_proto::ota::is_valid_hw_revision(&o.hw_revision) {
                    bail!(
                        "cohort {}: ota.hw_revision {:?} is not a valid hardware revision",
                        c.name,
                        o.hw_revision
                    );
                }
                if o.download_bytes_per_s == 0 {
                    bail!(
                        "cohort {}: ota.download_bytes_per_s must be positive",
                        c.name
                    );
                }
                if o.battery_min_pct > 100 {
                    bail!("cohort {}: ota.battery_min_pct must be 0..=100", c.name);
                }
                if o.health_deadline.0 < 1_000 || o.health_deadline.0 > 86_400_000 {
                    bail!(
                        "cohort {}: ota.health_deadline must be between 1s and 24h",
                        c.name
                    );
                }
                if !(0.0..=1.0).contains(&o.power_loss_rate) || o.power_loss_within.0 == 0 {
                    bail!("cohort {}: ota.power_loss_rate must be between 0 and 1 and power_loss_within positive", c.name);
                }
            }
            let prefix = c
                .id_prefix
                .clone()
                .unwrap_or_else(|| format!("{}-", c.name));
            mooring_proto::DeviceId::parse(&format!("{prefix}{}", c.count)).map_err(|e| {
                anyhow::anyhow!("cohort {}: device ids would be invalid: {e}", c.name)
            })?;
        }
        if !matches!(self.server, ServerTarget::InProcess) {
            if let Some(c) = self.cohorts.iter().find(|c| c.enroll.is_some()) {
                bail!(
                    "cohort {}: enroll needs the in-process server ([server] mode = \"in-process\")",
                    c.name
                );
            }
        }
        self.validate_ota()?;
        let enrolling = self.cohorts.iter().any(|c| c.enroll.is_some());
        if !enrolling
            && (self.expect.enrolled_exactly_once.is_some()
                || self.expect.max_duplicate_certificates.is_some())
        {
            bail!("[expect] enrolled_exactly_once and max_duplicate_certificates need a cohort with enroll");
        }
        match &self.server {
            ServerTarget::Cluster {
                nodes,
                heartbeat_interval,
                node_lease,
            } => {
                if !(2..=CLUSTER_NODES_MAX).contains(nodes) {
                    bail!("[server] nodes must be between 2 and {CLUSTER_NODES_MAX}, not {nodes}");
                }
                if heartbeat_interval.0 == 0 || node_lease.0 < 2 * heartbeat_interval.0 {
                    bail!("[server] heartbeat_interval must be positive and node_lease at least twice as long");
                }
            }
            _ if !self.expect.max_cluster_counters.is_empty() => {
                bail!("[expect] max_cluster_counters needs [server] mode = \"cluster\"");
            }
            _ => {}
        }
        for name in self.expect.max_cluster_counters.keys() {
            if !CLUSTER_COUNTERS.contains(&name.as_str()) {
                bail!(
                    "[expect] max_cluster_counters: unknown counter {name:?} (known: {})",
                    CLUSTER_COUNTERS.join(", ")
                );
            }
        }
        for e in &self.events {
            if e.at > self.duration {
                bail!("an event at {} ms is after the end of the scenario", e.at.0);
            }
            match &e.action {
                Action::Command { to, name, ttl, .. } => {
                    mooring_proto::selector::Selector::parse(to).map_err(|err| {
                        anyhow::anyhow!("command event at {} ms: selector {to:?}: {err}", e.at.0)
                    })?;
                    if name.is_empty() {
                        bail!("command event at {} ms: name is empty", e.at.0);
                    }
                    if ttl.is_some_and(|t| t.0 < 1_000) {
                        bail!("command event at {} ms: ttl must be at least 1s", e.at.0);
                    }
                }
                Action::CutLink { duration, .. } if duration.0 == 0 => {
                    bail!("cut_link event at {} ms: duration must be positive", e.at.0);
                }
                Action::DeleteDevice { device } => {
                    mooring_proto::DeviceId::parse(device).map_err(|err| {
                        anyhow::anyhow!("delete_device event at {} ms: {err}", e.at.0)
                    })?;
                }
                Action::Retag { to, .. } => {
                    mooring_proto::selector::Selector::parse(to).map_err(|err| {
                        anyhow::anyhow!("retag event at {} ms: selector {to:?}: {err}", e.at.0)
                    })?;
                }
                Action::TagJob { to, tags } => {
                    mooring_proto::selector::Selector::parse(to).map_err(|err| {
                        anyhow::anyhow!("tag_job event at {} ms: selector {to:?}: {err}", e.at.0)
                    })?;
                    if tags.is_empty() {
                        bail!("tag_job event at {} ms: tags is empty", e.at.0);
                    }
                    if matches!(self.server, ServerTarget::Remote { .. }) {
                        bail!(
                            "tag_job event at {} ms: needs the in-process server or a cluster",
                            e.at.0
                        );
                    }
                }
                Action::ReportJob {
                    to, since, until, ..
                } => {
                    mooring_proto::selector::Selector::parse(to).map_err(|err| {
                        anyhow::anyhow!("report_job event at {} ms: selector {to:?}: {err}", e.at.0)
                    })?;
                    if since.0 >= until.0 || until.0 > e.at.0 {
                        bail!(
                            "report_job event at {} ms: needs since < until <= the event's time",
                            e.at.0
                        );
                    }
                    if matches!(self.server, ServerTarget::Remote { .. }) {
                        bail!(
                            "report_job event at {} ms: needs the in-process server or a cluster",
                            e.at.0
                        );
                    }
                }
                Action::RestartServer { .. } if self.server.cluster_nodes().is_some() => {
                    bail!(
                        "restart_server event at {} ms: in cluster mode, use kill_node and restart_node",
                        e.at.0
                    );
                }
                Action::KillNode { node } | Action::RestartNode { node } => {
                    let what = e.action.name();
                    let Some(nodes) = self.server.cluster_nodes() else {
                        bail!(
                            "{what} event at {} ms: needs [server] mode = \"cluster\"",
                            e.at.0
                        );
                    };
                    if !(1..=nodes).contains(node) {
                        bail!(
                            "{what} event at {} ms: there is no node {node} (nodes are 1 to {nodes})",
                            e.at.0
                        );
                    }
                }
                _ => {}
            }
        }
        self.validate_node_events()
    }

    /// Cluster mode: plays the `kill_node` and `restart_node` events in order (by time, then
    /// as written, as the run plays them): no node is killed twice or restarted while it runs,
    /// and one node always stays alive.
    /// `[[artifact]]`s, `ota_deploy` events, `[cohort.ota]` and the OTA expectations agree.
    fn validate_ota(&self) -> anyhow::Result<()> {
        let mut versions = std::collections::BTreeSet::new();
        for a in &self.artifacts {
            if !versions.insert(a.version.as_str()) {
                bail!("[[artifact]] version {:?} is given twice", a.version);
            }
            if a.size_bytes == 0 || a.size_bytes > ARTIFACT_BYTES_MAX {
                bail!(
                    "[[artifact]] {}: size_bytes must be between 1 and {ARTIFACT_BYTES_MAX}",
                    a.version
                );
            }
            if a.compatible.is_empty() {
                bail!(
                    "[[artifact]] {}: compatible names no hardware revision",
                    a.version
                );
            }
        }
        let updating = self.cohorts.iter().any(|c| c.ota.is_some());
        if updating && !matches!(self.server, ServerTarget::InProcess) {
            bail!("[cohort.ota] needs the in-process server ([server] mode = \"in-process\")");
        }
        if !self.artifacts.is_empty() && !matches!(self.server, ServerTarget::InProcess) {
            bail!("[[artifact]] needs the in-process server ([server] mode = \"in-process\")");
        }
        for e in &self.events {
            if let Action::OtaDeploy { version, to, .. } = &e.action {
                if !versions.contains(version.as_str()) {
                    bail!(
                        "ota_deploy event at {} ms: no [[artifact]] has version {version:?}",
                        e.at.0
                    );
                }
                mooring_proto::selector::Selector::parse(to).map_err(|err| {
                    anyhow::anyhow!("ota_deploy event at {} ms: selector {to:?}: {err}", e.at.0)
                })?;
            }
            if let Action::Rollout(r) = &e.action {
                if !versions.contains(r.version.as_str()) {
                    bail!(
                        "rollout event at {} ms: no [[artifact]] has version {:?}",
                        e.at.0,
                        r.version
                    );
                }
                mooring_proto::selector::Selector::parse(&r.to).map_err(|err| {
                    anyhow::anyhow!("rollout event at {} ms: selector {:?}: {err}", e.at.0, r.to)
                })?;
                r.request("art_check", self.seed)
                    .spec()
                    .map_err(|err| anyhow::anyhow!("rollout event at {} ms: {err}", e.at.0))?;
            }
        }
        if let Some(r) = &self.rollouts {
            r.validate()?;
        }
        for c in &self.cohorts {
            let Some(o) = &c.ota else { continue };
            for (version, l) in &o.link_by_version {
                for (what, v) in [
                    ("drops_per_day", l.drops_per_day),
                    ("outages_per_day", l.outages_per_day),
                ] {
                    if v.is_some_and(|r| !(r >= 0.0 && r.is_finite())) {
                        bail!(
                            "cohort {}: ota.link_by_version.{version:?}.{what} must be a non-negative number",
                            c.name
                        );
                    }
                }
            }
        }
        for (version, want) in &self.expect.rollouts {
            let has = self
                .events
                .iter()
                .any(|e| matches!(&e.action, Action::Rollout(r) if r.version == *version));
            if !has {
                bail!("[expect] rollouts names {version:?}, which no rollout event rolls out");
            }
            if let Some(st) = &want.state {
                if !ROLLOUT_STATES.contains(&st.as_str()) {
                    bail!(
                        "[expect] rollouts.{version:?}.state: {st:?} is not one of {}",
                        ROLLOUT_STATES.join(", ")
                    );
                }
            }
            for (cohort, share) in &want.cohort_updated_share_max {
                if !self.cohorts.iter().any(|c| &c.name == cohort) {
                    bail!("[expect] rollouts.{version:?}.cohort_updated_share_max: no cohort {cohort:?}");
                }
                if !(0.0..=1.0).contains(share) {
                    bail!("[expect] rollouts.{version:?}.cohort_updated_share_max.{cohort}: a share from 0 to 1");
                }
            }
        }
        let x = &self.expect;
        let wants_ota = x.max_ota_unbootable.is_some()
            || x.max_ota_untruthful.is_some()
            || x.max_ota_unsettled.is_some()
            || x.min_ota_committed.is_some()
            || x.min_ota_rolled_back.is_some();
        if wants_ota && !updating {
            bail!("[expect] max_ota_* and min_ota_* need a cohort with [cohort.ota]");
        }
        Ok(())
    }

    fn validate_node_events(&self) -> anyhow::Result<()> {
        let Some(nodes) = self.server.cluster_nodes() else {
            return Ok(());
        };
        // `None`: running; `Some(at)`: killed at that time.
        let mut killed: Vec<Option<u64>> = vec![None; nodes];
        let mut events: Vec<(usize, &Event)> = self.events.iter().enumerate().collect();
        events.sort_by_key(|(i, e)| (e.at, *i));
        for (_, e) in events {
            match &e.action {
                Action::KillNode { node } => {
                    let Some(state) = node.checked_sub(1).and_then(|i| killed.get_mut(i)) else {
                        continue;
                    };
                    if let Some(at) = state {
                        bail!(
                            "kill_node event at {} ms: node {node} is already dead (killed at {at} ms)",
                            e.at.0
                        );
                    }
                    *state = Some(e.at.0);
                    if killed.iter().all(Option::is_some) {
                        bail!(
                            "kill_node event at {} ms: node {node} is the last one alive; a cluster needs one",
                            e.at.0
                        );
                    }
                }
                Action::RestartNode { node } => {
                    let Some(state) = node.checked_sub(1).and_then(|i| killed.get_mut(i)) else {
                        continue;
                    };
                    if state.is_none() {
                        bail!(
                            "restart_node event at {} ms: node {node} is running (only a killed node can be restarted)",
                            e.at.0
                        );
                    }
                    *state = None;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The same scenario with `devices` devices in total, spread over the cohorts in proportion
    /// (the last cohort takes the rounding remainder). Count-like expectations scale along:
    /// minimums round down, maximums round up.
    pub fn scaled_to(&self, devices: usize) -> anyhow::Result<Scenario> {
        let total = self.device_count();
        if devices == 0 || devices > DEVICES_MAX {
            bail!("--devices must be between 1 and {DEVICES_MAX}");
        }
        let mut s = self.clone();
        let mut left = devices;
        let last = s.cohorts.len() - 1;
        for (i, c) in s.cohorts.iter_mut().enumerate() {
            let n = if i == last {
                left
            } else {
                ((c.count as u128 * devices as u128) / total as u128) as usize
            };
            let n = n.min(left);
            c.count = n;
            left -= n;
        }
        let ratio = devices as f64 / total as f64;
        let down = |v: u64| (v as f64 * ratio).floor() as u64;
        let up = |v: u64| (v as f64 * ratio).ceil() as u64;
        let e = &mut s.expect;
        e.min_online_at_end = e.min_online_at_end.map(|v| down(v as u64) as usize);
        e.min_telemetry_stored = e.min_telemetry_stored.map(down);
        e.min_commands_succeeded = e.min_commands_succeeded.map(down);
        e.max_commands_not_succeeded = e.max_commands_not_succeeded.map(up);
        e.min_ota_committed = e.min_ota_committed.map(down);
        e.min_ota_rolled_back = e.min_ota_rolled_back.map(down);
        s.validate()?;
        Ok(s)
    }
}

/// The metric every simulated telemetry message carries: a per-device message counter
/// (1, 2, 3, ...), so the end-of-run check knows exactly which messages the store holds.
pub const SEQ_METRIC: &str = "sim.n";

impl Cohort {
    pub fn device_id(&self, n: usize) -> String {
        match &self.id_prefix {
            Some(p) => format!("{p}{n}"),
            None => format!("{}-{n}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(DurationMs::parse("500ms"), Ok(DurationMs(500)));
        assert_eq!(DurationMs::parse("2h"), Ok(DurationMs(7_200_000)));
        assert!(DurationMs::parse("5").is_err());
        assert!(DurationMs::parse("5y").is_err());
        assert!(DurationMs::parse("m").is_err());
    }

    #[test]
    fn enroll_cohorts_are_validated() {
        let base = r#"
            name = "t"
            duration = "1h"
            [[cohort]]
            name = "s"
            count = 10
        "#;
        let parse = |extra: &str| -> anyhow::Result<Scenario> {
            let s: Scenario = toml::from_str(&format!("{base}{extra}"))?;
            s.validate()?;
            Ok(s)
        };
        let s = parse("[cohort.enroll]\nclaim_uses = 3\nfault_rate = 0.5\n[expect]\nenrolled_exactly_once = true\nmax_duplicate_certificates = 0\n")
            .expect("valid");
        let e = s.cohorts[0].enroll.as_ref().expect("enroll");
        assert_eq!((e.claim_uses, e.first_connect_outage.0), (3, 30_000));
        assert!(parse("[cohort.enroll]\nclaim_uses = 0\n").is_err());
        assert!(parse("[cohort.enroll]\nfault_rate = 1.5\n").is_err());
        assert!(parse("[cohort.enroll]\nunknown = 1\n").is_err());
        // The enrollment expectations need an enrolling cohort.
        assert!(parse("[expect]\nenrolled_exactly_once = true\n").is_err());
        // Only against the in-process server.
        let cluster = r#"
            [server]
            mode = "cluster"
            nodes = 2
            [cohort.enroll]
        "#;
        let err = parse(cluster).expect_err("cluster").to_string();
        assert!(err.contains("enroll needs the in-process server"), "{err}");
    }

    #[test]
    fn rollout_events_and_their_expectations_are_checked() {
        let parse = |event: &str, expect: &str| -> anyhow::Result<Scenario> {
            let s: Scenario = toml::from_str(&format!(
                "name = \"r\"\nduration = \"1h\"\n\
                 [rollouts]\ntick_ms = 1000\n\
                 [[artifact]]\nversion = \"2.0.0\"\nsize_bytes = 10\ncompatible = [\"rev-a\"]\n\
                 [[cohort]]\nname = \"a\"\ncount = 10\n\
                 [cohort.ota]\nlink_by_version = {{ \"2.0.0\" = {{ drops_per_day = 100 }} }}\n\
                 [[event]]\nat = \"5m\"\naction = \"rollout\"\nversion = \"2.0.0\"\n{event}\n\
                 [expect]\n{expect}\n"
            ))?;
            s.validate()?;
            Ok(s)
        };
        let s = parse(
            "selector = \"tag:x=y\"\nwaves = [10, 100]\nhealth_window = \"10m\"",
            "rollouts = { \"2.0.0\" = { state = \"paused\", waves_started_max = 1, cohort_updated_share_max = { a = 0.1 } } }",
        )
        .expect("valid");
        let Action::Rollout(r) = &s.events[0].action else {
            panic!("a rollout event");
        };
        let req = r.request("art_1", s.seed);
        assert_eq!(
            (req.selector.as_str(), req.health_window_ms, req.seed),
            ("tag:x=y", Some(600_000), Some(1))
        );
        assert_eq!(s.rollouts.as_ref().map(|r| r.tick_ms), Some(1000));
        let ota = s.cohorts[0].ota.as_ref().expect("ota");
        assert_eq!(ota.link_by_version["2.0.0"].drops_per_day, Some(100.0));
        // The rollout's own rules are the API's.
        assert!(
            error(parse("to = \"tag:x=y\"\nwaves = [10, 50]", "")).contains("the last one is 100")
        );
        assert!(error(parse("to = \"tag:x=y\"\nbogus = 1", "")).contains("bogus"));
        assert!(error(parse("to = \"tag:x=y\"\nversion = \"3.0.0\"", "")).contains("duplicate"));
        // Expectations name a rolled-out version, a known state and cohort, a share.
        let to = "to = \"tag:x=y\"";
        assert!(error(parse(
            to,
            "rollouts = { \"9.9.9\" = { state = \"paused\" } }"
        ))
        .contains("no rollout event rolls out"));
        assert!(
            error(parse(to, "rollouts = { \"2.0.0\" = { state = \"done\" } }"))
                .contains("is not one of")
        );
        assert!(error(parse(
            to,
            "rollouts = { \"2.0.0\" = { cohort_updated_share_max = { b = 0.1 } } }"
        ))
        .contains("no cohort \"b\""));
        assert!(error(parse(
            to,
            "rollouts = { \"2.0.0\" = { cohort_updated_share_max = { a = 2 } } }"
        ))
        .contains("a share from 0 to 1"));
    }

    #[test]
    fn parses_and_validates() {
        let s: Scenario = toml::from_str(
            r#"
            name = "t"
            duration = "1h"
            [[cohort]]
            name = "locks"
            count = 10
            tags = { site = "berlin" }
            [cohort.metrics.temp]
            kind = "gauge"
            mean = 20.0
            jitter = 1.0
            [[event]]
            at = "10m"
            action = "cut_link"
            region = "eu"
            duration = "5m"
            [[event]]
            at = "20m"
            action = "command"
            to = "tag:site=berlin"
            name = "reboot"
            [expect]
            lost_acked_telemetry = 0
            "#,
        )
        .expect("parses");
        s.validate().expect("valid");
        assert_eq!(s.device_count(), 10);
        assert_eq!(s.cohorts[0].device_id(3), "locks-3");
        assert!(toml::from_str::<Scenario>(
            "name = \"x\"\nduration = \"1h\"\ncohort = []\nbogus = 1"
        )
        .is_err());
    }

    fn cluster(server: &str, events: &str) -> anyhow::Result<Scenario> {
        let s: Scenario = toml::from_str(&format!(
            "name = \"c\"\nduration = \"1h\"\n[server]\n{server}\n\
             [[cohort]]\nname = \"d\"\ncount = 10\n{events}"
        ))?;
        s.validate()?;
        Ok(s)
    }

    fn kill(at: &str, node: usize) -> String {
        format!("[[event]]\nat = \"{at}\"\naction = \"kill_node\"\nnode = {node}\n")
    }

    fn restart(at: &str, node: usize) -> String {
        format!("[[event]]\nat = \"{at}\"\naction = \"restart_node\"\nnode = {node}\n")
    }

    fn error(r: anyhow::Result<Scenario>) -> String {
        match r {
            Ok(_) => "valid".to_owned(),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn cluster_mode_and_node_events_are_checked() {
        let three = "mode = \"cluster\"\nnodes = 3";
        let ok = cluster(
            three,
            &format!("{}{}{}", kill("10m", 2), restart("20m", 2), kill("30m", 1)),
        )
        .expect("valid");
        assert_eq!(ok.server.cluster_nodes(), Some(3));
        assert!(error(cluster("mode = \"cluster\"\nnodes = 1", "")).contains("between 2 and 16"));
        assert!(error(cluster("mode = \"cluster\"\nnodes = 17", "")).contains("between 2 and 16"));
        assert!(error(cluster(three, &kill("10m", 4))).contains("there is no node 4"));
        assert!(error(cluster(three, &kill("10m", 0))).contains("there is no node 0"));
        assert!(error(cluster(
            three,
            &format!("{}{}", kill("10m", 2), kill("20m", 2))
        ))
        .contains("node 2 is already dead (killed at 600000 ms)"));
        assert!(error(cluster(
            three,
            &format!("{}{}{}", kill("10m", 1), kill("20m", 2), kill("30m", 3))
        ))
        .contains("node 3 is the last one alive"));
        assert!(error(cluster(three, &restart("10m", 2))).contains("node 2 is running"));
        // Order is by time, not as written.
        cluster(three, &format!("{}{}", restart("20m", 2), kill("10m", 2))).expect("valid");
        assert!(error(cluster("mode = \"in-process\"", &kill("10m", 1)))
            .contains("needs [server] mode = \"cluster\""));
        assert!(error(cluster(
            three,
            "[[event]]\nat = \"10m\"\naction = \"restart_server\"\n"
        ))
        .contains("use kill_node and restart_node"));
        assert!(error(cluster(
            &format!("{three}\nheartbeat_interval = \"3s\"\nnode_lease = \"5s\""),
            ""
        ))
        .contains("node_lease at least twice"));
        assert!(error(cluster(
            three,
            "[expect]\nmax_cluster_counters = { bogus = 0 }"
        ))
        .contains("unknown counter \"bogus\""));
        assert!(error(cluster(
            "mode = \"in-process\"",
            "[expect]\nmax_cluster_counters = { takeovers = 0 }"
        ))
        .contains("needs [server] mode"));
    }
}
