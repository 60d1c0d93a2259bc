//! One simulation run: start the server, register and boot the fleet, play the scenario's
//! events on virtual time, sample the fleet, then stop everything and measure against the store.
//!
//! Determinism: every device's randomness comes from (seed, device index); devices are spawned
//! in a fixed order; timestamps come from the virtual clock. Telemetry and command time series
//! are built from virtual timestamps recorded when things happened (ack times, command
//! history), not from queries racing the store, so the same seed gives the same report (wall
//! time and memory aside).
//!
//! This file starts, runs and stops the fleet and assembles the [`Report`]; `events.rs` plays the
//! scenario's events and `measure.rs` samples the fleet and reads back what the server stored.

mod enroll;
mod events;
mod gateways;
mod health;
mod measure;
mod ota;
mod reports;
mod rollouts;

pub(crate) use events::fmt_ms;
pub use measure::parse_metrics;

use events::run_events;
use measure::{check_expectations, run_sampler, Reader};

use crate::clock::VirtualClock;
use crate::device::{self, CohortModel, DeviceState, Net, Stats};
use crate::harness::{node_id, ClusterParts, InProcessServer, Tuning};
use crate::remote::RemoteApi;
use crate::report::{Completed, FaultCount, LeaseMove, NodeReport, Report, Sample, TimelineEvent};
use crate::scenario::{Action, Scenario, ServerTarget};
use anyhow::Context as _;
use mooring_proto::sync::{lock, read, write};
use mooring_proto::{Clock, DeviceId};
use mooring_server::app::App;
use mooring_store::CommandState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Unix ms at virtual time zero (2026-01-01T00:00:00Z): fixed, so runs repeat exactly.
pub const EPOCH_MS: u64 = 1_767_225_600_000;
/// Commands read per device at the end.
pub const COMMANDS_PER_DEVICE_MAX: usize = 1_000;
/// Lost messages listed by name in the report (the count is always exact).
pub const LOST_EXAMPLES_MAX: usize = 20;

/// Runs `scenario` on a fresh current-thread runtime with a paused clock (virtual time), with
/// the server's data in `data_dir`.
pub fn run_blocking(scenario: &Scenario, data_dir: &Path) -> anyhow::Result<Report> {
    // Remote mode runs in real time (the server's clock is the wall clock).
    let paused = !matches!(scenario.server, ServerTarget::Remote { .. });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(paused)
        .build()
        .context("building the simulator's runtime")?;
    rt.block_on(run(scenario, data_dir))
}

/// Devices (by index) whose reconnection an event waits for, from a virtual ms on.
type Watch = (u64, Vec<usize>);

/// What the control tasks (events, sampler) share with the run.
struct Control {
    /// The in-process servers by slot: the one server (slot 0), or cluster node `slot + 1`;
    /// `None` while down.
    servers: tokio::sync::Mutex<Vec<Option<InProcessServer>>>,
    /// Each slot's app; `None` while it is down. Never held across a shutdown.
    apps: RwLock<Vec<Option<Arc<App>>>>,
    net: Arc<Net>,
    data_dir: PathBuf,
    server_clock: Arc<dyn Clock>,
    /// Cluster mode: the store, bus and key the nodes share.
    cluster: Option<ClusterParts>,
    /// Cluster mode: each node's starts, kills and the counters of its killed runs, by slot.
    node_history: Mutex<Vec<NodeHistory>>,
    /// Cluster mode: where each killed node's leases went, by (the kill event's time, node id).
    lease_moves: Mutex<BTreeMap<(u64, String), Vec<LeaseMove>>>,
    /// Watches events start that outlive them (where a killed node's leases go); aborted
    /// when the run ends.
    watchers: Mutex<JoinSet<()>>,
    /// (event index, fleet command id, devices targeted).
    fleet_commands: Mutex<Vec<(usize, String, u64)>>,
    /// The `tag_job` events' job ids, in the order created.
    jobs: Mutex<Vec<String>>,
    /// What the scenario sets of the server's configuration, for every start.
    tuning: Tuning,
    /// In-process: fleet command id -> wall ms from its creation until every device command
    /// was final (watched by polling its counts every simulated 100 ms).
    fleet_done_wall_ms: Mutex<HashMap<String, u64>>,
    event_log: Mutex<Vec<String>>,
    event_errors: Mutex<Vec<String>>,
    deleted: Mutex<HashSet<String>>,
    faults: Mutex<BTreeMap<String, FaultCount>>,
    samples: Mutex<Vec<Sample>>,
    /// Every event's outcome, in the order played, with the devices whose reconnection it
    /// waits for (since when, device indices): `cut_link` and `restart_server`.
    timeline: Mutex<Vec<(TimelineEvent, Option<Watch>)>>,
    /// Remote mode: the server's API (no in-process server then).
    remote: Option<Arc<RemoteApi>>,
    /// The `[[artifact]]`s as uploaded.
    artifacts: Vec<ota::SimArtifact>,
    /// The `ota_deploy` events' deployments, in the order made.
    deployments: Mutex<Vec<ota::SimDeployment>>,
    /// The `rollout` events' rollouts, in the order made.
    rollouts: Mutex<Vec<rollouts::SimRollout>>,
    /// Per rollout id: the wall ms since the run started at which each entry of its event log
    /// (by seq) was seen (polled every simulated 10 s).
    rollout_wall_ms: Mutex<HashMap<String, BTreeMap<u64, u64>>>,
    /// When the run started (wall clock).
    wall_start: std::time::Instant,
}

/// Cluster mode: one node's past, by slot.
#[derive(Debug, Default, Clone)]
struct NodeHistory {
    starts: u64,
    kills: u64,
    /// Its cluster counters as they were when each of its runs was killed, summed.
    counters: BTreeMap<String, u64>,
}

/// A node's cluster counters from its metrics: `mooring_cluster_<name>_total` -> name.
fn cluster_counters(metrics: &BTreeMap<String, f64>) -> BTreeMap<String, u64> {
    metrics
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("mooring_cluster_")?.strip_suffix("_total")?;
            (!name.contains('{')).then(|| (name.to_owned(), *v as u64))
        })
        .collect()
}

/// Starts the server of `slot`: the one in-process server, or cluster node `slot + 1` on the
/// cluster's shared parts.
async fn start_server(
    data_dir: &Path,
    clock: Arc<dyn Clock>,
    cluster: Option<&ClusterParts>,
    slot: usize,
    tuning: &Tuning,
) -> anyhow::Result<InProcessServer> {
    match cluster {
        Some(parts) => InProcessServer::start_node(data_dir, clock, parts, slot + 1, tuning).await,
        None => InProcessServer::start(data_dir, clock, tuning).await,
    }
}

impl Control {
    /// A running server's app (cluster mode: the first live node's).
    fn app(&self) -> Option<Arc<App>> {
        read(&self.apps).iter().flatten().next().cloned()
    }

    /// Every running server's app, with its slot.
    fn live_apps(&self) -> Vec<(usize, Arc<App>)> {
        read(&self.apps)
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Some((i, a.clone()?)))
            .collect()
    }

    fn set_app(&self, slot: usize, app: Option<Arc<App>>) {
        if let Some(a) = write(&self.apps).get_mut(slot) {
            *a = app;
        }
    }

    /// Puts the server of `slot` on the network.
    fn put_server(&self, slot: usize, s: &InProcessServer) {
        self.net.set_node(slot, s.server.app.broker().cloned());
        self.net
            .set_http(slot, mooring_server::http::router(s.server.app.clone()));
        self.set_app(slot, Some(s.server.app.clone()));
    }

    async fn start_server(&self, slot: usize) -> anyhow::Result<InProcessServer> {
        start_server(
            &self.data_dir,
            self.server_clock.clone(),
            self.cluster.as_ref(),
            slot,
            &self.tuning,
        )
        .await
    }

    /// The `tag_job` events' jobs as they are now (`unknown` if no server is up).
    async fn job_reports(&self) -> Vec<crate::report::JobReport> {
        let ids = lock(&self.jobs).clone();
        let app = self.app();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let job = match &app {
                Some(app) => app
                    .jobs
                    .get(&mooring_server::access::Access::all(), &id)
                    .await
                    .ok(),
                None => None,
            };
            out.push(match job {
                Some(j) => {
                    let mut r = crate::report::JobReport {
                        id,
                        action: j.action.clone(),
                        state: j.state.as_str().to_owned(),
                        total: j.total,
                        done: j.done,
                        failed: j.failed,
                        run_ms: j
                            .finished_ms
                            .zip(j.started_ms)
                            .map(|(f, s)| f.saturating_sub(s)),
                        ..Default::default()
                    };
                    if let Some(app) = app.as_ref().filter(|_| r.state == "succeeded") {
                        if j.action == mooring_server::reports::REPORT_ACTION {
                            reports::check(app, &j, &mut r).await;
                        }
                    }
                    r
                }
                None => crate::report::JobReport {
                    id,
                    state: "unknown".to_owned(),
                    ..Default::default()
                },
            });
        }
        out
    }

    /// Devices with a session (cluster mode: summed over the live nodes).
    async fn online_count(&self) -> u64 {
        match &self.remote {
            Some(api) => api
                .metrics()
                .await
                .ok()
                .and_then(|m| m.get("mooring_devices_online").copied())
                .map_or(0, |v| v as u64),
            None => self
                .live_apps()
                .iter()
                .map(|(_, a)| a.presence.online_count() as u64)
                .sum(),
        }
    }

    /// The server's metrics (cluster mode: each summed over the live nodes).
    async fn server_metrics(&self) -> BTreeMap<String, f64> {
        match &self.remote {
            Some(api) => api.metrics().await.unwrap_or_default(),
            None => {
                let mut sum: BTreeMap<String, f64> = BTreeMap::new();
                for (_, a) in self.live_apps() {
                    for (k, v) in parse_metrics(&mooring_server::render_metrics(&a)) {
                        *sum.entry(k).or_default() += v;
                    }
                }
                sum
            }
        }
    }

    async fn is_online(&self, id: &str) -> bool {
        match &self.remote {
            Some(api) => api.is_online(id).await.unwrap_or(false),
            None => self.live_apps().iter().any(|(_, a)| a.presence.get(id).0),
        }
    }

    /// Cluster mode: the devices among `ids` the cluster answers online (asked of one live
    /// node: its own sessions and, through the store, every live node's).
    async fn cluster_online(&self, ids: &[String]) -> anyhow::Result<Option<u64>> {
        let (Some(parts), Some(app)) = (&self.cluster, self.app()) else {
            return Ok(None);
        };
        let alive_since = self
            .server_clock
            .now_ms()
            .saturating_sub(parts.node_lease_ms);
        let mut n = 0u64;
        for chunk in ids.chunks(mooring_store::SESSION_LOOKUP_LEN_MAX) {
            n += app.presence.online(chunk, alive_since).await?.len() as u64;
        }
        Ok(Some(n))
    }

    /// Cluster mode: every node as it is now, with its past.
    fn node_reports(&self) -> Vec<NodeReport> {
        let history = lock(&self.node_history).clone();
        let apps = read(&self.apps).clone();
        history
            .into_iter()
            .enumerate()
            .map(|(slot, h)| {
                let mut counters = h.counters;
                let mut report = NodeReport {
                    id: node_id(slot + 1),
                    starts: h.starts,
                    kills: h.kills,
                    ..NodeReport::default()
                };
                if let Some(Some(app)) = apps.get(slot) {
                    let metrics = parse_metrics(&mooring_server::render_metrics(app));
                    for (k, v) in cluster_counters(&metrics) {
                        *counters.entry(k).or_default() += v;
                    }
                    report.alive_at_end = true;
                    report.devices_at_end = app.presence.online_count() as u64;
                    report.leases_at_end = app.cluster().map_or_else(Vec::new, |c| {
                        c.held_leases().iter().map(|l| (*l).to_owned()).collect()
                    });
                }
                report.counters = counters;
                report
            })
            .collect()
    }

    fn fault(&self, kind: &str, injected: u64, detected: u64) {
        let mut f = lock(&self.faults);
        let e = f.entry(kind.to_owned()).or_default();
        e.injected += injected;
        e.detected += detected;
    }

    fn happened(&self, event: TimelineEvent, watch: Option<Watch>) {
        lock(&self.timeline).push((event, watch));
    }

    fn log(&self, line: String) {
        tracing::info!("{line}");
        lock(&self.event_log).push(line);
    }

    fn error(&self, line: String) {
        tracing::warn!("{line}");
        lock(&self.event_errors).push(line);
    }
}

fn rss_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Runs the scenario on the current runtime, which must have a paused clock for virtual time.
pub async fn run(s: &Scenario, data_dir: &Path) -> anyhow::Result<Report> {
    let wall_start = std::time::Instant::now();
    let remote = match &s.server {
        ServerTarget::InProcess | ServerTarget::Cluster { .. } => None,
        ServerTarget::Remote {
            mqtt,
            api,
            token_file,
        } => {
            let run_id = format!("sim{}", mooring_proto::SystemClock.now_ms() % 100_000_000);
            Some(Arc::new(RemoteApi::new(mqtt, api, token_file, run_id)?))
        }
    };
    // In-process: a fixed epoch on virtual time. Remote: the wall clock (the server's).
    let epoch_ms = if remote.is_some() {
        mooring_proto::SystemClock.now_ms()
    } else {
        EPOCH_MS
    };
    let clock = VirtualClock::new(epoch_ms);
    let server_clock: Arc<dyn Clock> = Arc::new(clock);
    let stats = Arc::new(Stats::new(s.duration.0, s.sample_interval.0));
    let slots = s.server.cluster_nodes().unwrap_or(1);
    let net = Arc::new(Net::new(clock, stats.clone(), slots));
    let cluster = match &s.server {
        ServerTarget::Cluster {
            heartbeat_interval,
            node_lease,
            ..
        } => Some(ClusterParts::open(
            data_dir,
            heartbeat_interval.0,
            node_lease.0,
        )?),
        _ => None,
    };
    let tuning = Tuning {
        job_batch_pause_ms: s.job_batch_pause.0,
        job_report_points_per_turn: s.job_report_points_per_turn,
        health: s.health.clone().unwrap_or_default(),
        rollouts: s.rollouts.clone().unwrap_or_default(),
        playbooks: s.playbooks.clone(),
        parts: s.parts.clone(),
    };
    let mut servers: Vec<Option<InProcessServer>> = Vec::new();
    if remote.is_none() {
        for slot in 0..slots {
            let server = start_server(
                data_dir,
                server_clock.clone(),
                cluster.as_ref(),
                slot,
                &tuning,
            )
            .await?;
            servers.push(Some(server));
        }
    }
    let server = servers.first().and_then(Option::as_ref);
    let creds_dir = match &remote {
        Some(_) => {
            Some(tempfile::tempdir().context("creating a directory for device credentials")?)
        }
        None => None,
    };

    // The fleet, in a fixed order: cohort by cohort, device 0..count.
    let mut devices: Vec<Arc<DeviceState>> = Vec::with_capacity(s.device_count());
    let mut command_names: Vec<String> = s
        .events
        .iter()
        .filter_map(|e| match &e.action {
            Action::Command { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    command_names.sort();
    command_names.dedup();
    let claims = match server {
        Some(server) => enroll::Claims::create(s, server).await?,
        None => enroll::Claims::default(),
    };
    let artifacts = match server {
        Some(server) => ota::upload(s, &server.server.app).await?,
        None => Vec::new(),
    };
    if let Some(server) = server {
        health::create_rules(s, &server.server.app).await?;
    }
    let update_key = server.map(|server| server.server.app.ota.public_key_hex());
    let mut models = Vec::with_capacity(s.cohorts.len());
    for (ci, c) in s.cohorts.iter().enumerate() {
        for n in 0..c.count {
            let name = match &remote {
                Some(api) => api.device_id(&c.device_id(n)),
                None => c.device_id(n),
            };
            let id =
                DeviceId::parse(&name).map_err(|e| anyhow::anyhow!("cohort {}: {e}", c.name))?;
            let mut dev = DeviceState::new(devices.len(), id, ci, c, s.seed)?;
            dev.enroll = claims.probe(s, ci, n, dev.index, dev.id.as_str(), data_dir);
            if let Some(g) = &c.gateway {
                dev.gateway = Some(Arc::new(device::gateway::GatewayChildren::new(
                    &dev.id,
                    g,
                    s.duration.0,
                )?));
            }
            match (server, &remote, &creds_dir) {
                // An enrolling device registers itself, with the certificate it asks for.
                (Some(_), _, _) if dev.enroll.is_some() => {}
                (Some(server), _, _) => {
                    server.register(dev.id.as_str(), c.tags.clone()).await?;
                    gateways::register_children(server, &dev).await?;
                }
                (None, Some(_), _) if dev.gateway.is_some() => {
                    anyhow::bail!(
                        "cohort {}: gateway cohorts need the in-process server",
                        c.name
                    )
                }
                (None, Some(api), Some(dir)) => {
                    dev.tls = Some(api.register(dev.id.as_str(), &c.tags, dir.path()).await?);
                }
                _ => anyhow::bail!("no server to register {} with", dev.id),
            }
            devices.push(Arc::new(dev));
        }
        let agent_config = mooring_agent::AgentConfig {
            interval_secs: 0,
            keepalive_secs: c.keepalive.0 / 1000,
            outbox_max: c.outbox_max,
            firmware_version: Some(c.version.clone()),
            update: match (&c.ota, &update_key) {
                (Some(o), Some(key)) => Some(mooring_agent::ota::agent::UpdateConfig {
                    public_key: key.clone(),
                    hw_revision: o.hw_revision.clone(),
                    allow_downgrade: false,
                    battery_file: None,
                    battery_command: None,
                    battery_min_pct: o.battery_min_pct,
                    window: None,
                    busy_command: None,
                    health_command: None,
                    health_handlers: Vec::new(),
                    health_deadline_secs: (o.health_deadline.0 / 1000).max(1),
                }),
                _ => None,
            },
            gateway: c
                .gateway
                .as_ref()
                .map(|g| mooring_agent::gateway::GatewayConfig {
                    children_max: g.children,
                    ..mooring_agent::gateway::GatewayConfig::new("sim-children")
                }),
            ..mooring_agent::AgentConfig::new("sim", 1, "-", "-", "-", "-")
        };
        let device_clock: Arc<dyn Clock> = Arc::new(clock.skewed(c.clock_skew_ms));
        models.push(Arc::new(CohortModel {
            cohort: c.clone(),
            clock: device_clock,
            agent_config,
            command_names: command_names.clone(),
        }));
    }
    let rss_base = rss_bytes("VmRSS:");
    let control = Arc::new(Control {
        servers: tokio::sync::Mutex::new(Vec::new()),
        apps: RwLock::new(vec![None; slots]),
        net: net.clone(),
        data_dir: data_dir.to_owned(),
        server_clock: server_clock.clone(),
        node_history: Mutex::new(match &cluster {
            Some(_) => vec![
                NodeHistory {
                    starts: 1,
                    ..NodeHistory::default()
                };
                slots
            ],
            None => Vec::new(),
        }),
        cluster,
        lease_moves: Mutex::new(BTreeMap::new()),
        watchers: Mutex::new(JoinSet::new()),
        fleet_commands: Mutex::new(Vec::new()),
        jobs: Mutex::new(Vec::new()),
        tuning: tuning.clone(),
        fleet_done_wall_ms: Mutex::new(HashMap::new()),
        event_log: Mutex::new(Vec::new()),
        event_errors: Mutex::new(Vec::new()),
        deleted: Mutex::new(HashSet::new()),
        faults: Mutex::new(BTreeMap::new()),
        samples: Mutex::new(Vec::new()),
        timeline: Mutex::new(Vec::new()),
        remote: remote.clone(),
        artifacts,
        deployments: Mutex::new(Vec::new()),
        rollouts: Mutex::new(Vec::new()),
        rollout_wall_ms: Mutex::new(HashMap::new()),
        wall_start,
    });
    for (slot, server) in servers.iter().enumerate() {
        if let Some(server) = server {
            control.put_server(slot, server);
        }
    }
    *control.servers.lock().await = servers;
    if let Some(api) = &remote {
        control.log(format!(
            "remote run {0}: {1} devices registered as {0}-<id> with tag sim_run={0} (left in place)",
            api.run,
            devices.len()
        ));
    }

    let start = Instant::now();
    let end = start + s.duration.as_std();
    let mut fleet: JoinSet<()> = JoinSet::new();
    for d in &devices {
        fleet.spawn(device::run_device(
            d.clone(),
            models[d.cohort].clone(),
            net.clone(),
            s.seed,
            start,
            end,
        ));
    }
    let mut tasks: JoinSet<()> = JoinSet::new();
    tasks.spawn(run_events(
        s.clone(),
        control.clone(),
        devices.clone(),
        start,
    ));
    tasks.spawn(run_sampler(
        control.clone(),
        start,
        end,
        s.sample_interval.as_std(),
    ));

    tokio::time::sleep_until(end).await;

    // The end, read before anything else moves.
    let online_at_end = control.online_count().await;
    let gateways_online = gateways::online(&control, &devices).await;
    let server_metrics = control.server_metrics().await;
    let reconnects: u64 = devices.iter().map(|d| d.reconnects_total()).sum();
    // A deleted device is detected when its session is gone and stays refused.
    let deleted_offline = {
        let deleted = lock(&control.deleted).clone();
        let mut n = 0u64;
        for id in &deleted {
            if !control.is_online(id).await {
                n += 1;
            }
        }
        n
    };
    control.fault("delete_device", 0, deleted_offline);
    let nodes = control.node_reports();
    let cluster_online_at_end = {
        let ids: Vec<String> = devices
            .iter()
            .map(|d| d.id.as_str().to_owned())
            .filter(|id| !lock(&control.deleted).contains(id))
            .collect();
        control.cluster_online(&ids).await?
    };
    let enrollment = match control.app() {
        Some(app) => {
            let expected = (devices.len() - lock(&control.deleted).len()) as u64;
            enroll::report(&app, &devices, &claims, epoch_ms, expected).await?
        }
        None => None,
    };
    let mut rollout_reports = rollouts::read(&control, epoch_ms).await;
    let jobs = control.job_reports().await;
    for j in &jobs {
        control.log(format!(
            "job {}: {} at the end, {}/{} devices done, {} failed, ran {}",
            j.id,
            j.state,
            j.done,
            j.total.map_or_else(|| "?".to_owned(), |t| t.to_string()),
            j.failed,
            j.run_ms.map_or_else(|| "-".to_owned(), events::fmt_ms),
        ));
    }
    let rss_end = rss_bytes("VmRSS:");
    let rss_peak = rss_bytes("VmHWM:");
    let st = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let telemetry_sent = st(&stats.telemetry_sent);
    let telemetry_acked = st(&stats.telemetry_acked);

    // Stop the fleet and the control tasks, then the servers (gracefully: the writers drain).
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let mut watchers = std::mem::take(&mut *lock(&control.watchers));
    watchers.abort_all();
    while watchers.join_next().await.is_some() {}
    fleet.abort_all();
    while fleet.join_next().await.is_some() {}
    // The fleet has stopped and the server still runs: neither side of an update moves.
    let ota_report = {
        let deleted = lock(&control.deleted).clone();
        let (ota, by_rollout) = ota::report(&control, s, &devices, &deleted).await?;
        rollouts::add_cohorts(&mut rollout_reports, &control, s, &by_rollout, &deleted);
        ota
    };
    let health_report = match control.app() {
        Some(app) => health::report(s, &app, epoch_ms).await?,
        None => None,
    };
    let reader = match &remote {
        Some(api) => Reader::Remote(api.clone()),
        None => {
            let mut servers: Vec<InProcessServer> = Vec::new();
            for (slot, server) in control.servers.lock().await.iter_mut().enumerate() {
                net.set_node(slot, None);
                control.set_app(slot, None);
                servers.extend(server.take());
            }
            if servers.is_empty() {
                // The run ended during a server restart's downtime: open the data dir to read it.
                servers.push(control.start_server(0).await?);
            }
            let readback = servers[0].server.app.readback();
            for server in servers {
                server.shutdown().await;
            }
            net.close().await;
            Reader::Store(readback)
        }
    };

    // Telemetry: every acknowledged sim.n must be in the store.
    let deleted = lock(&control.deleted).clone();
    let mut telemetry_stored = 0u64;
    let mut lost = 0u64;
    let mut lost_examples = Vec::new();
    for d in &devices {
        if deleted.contains(d.id.as_str()) {
            continue;
        }
        let generated = d.generated.load(Ordering::Relaxed) as usize;
        let stored: HashSet<u32> = reader
            .telemetry_values(d.id.as_str(), generated + 16)
            .await
            .with_context(|| format!("reading {}'s telemetry", d.id))?
            .into_iter()
            .collect();
        telemetry_stored += stored.len() as u64;
        let acked = lock(&d.acked);
        for n in acked.iter().filter(|n| !stored.contains(n)) {
            lost += 1;
            if lost_examples.len() < LOST_EXAMPLES_MAX {
                lost_examples.push(format!("{} sim.n={n}", d.id));
            }
        }
    }

    let gateway_report = gateways::report(&reader, &devices, &deleted, gateways_online).await?;

    // Commands: final states from the store; the time series from each command's history.
    let fleet_commands = lock(&control.fleet_commands).clone();
    let parents: HashMap<String, usize> = fleet_commands
        .iter()
        .map(|(ev, id, _)| (id.clone(), *ev))
        .collect();
    let commands_sent: u64 = fleet_commands.iter().map(|(_, _, n)| n).sum();
    let mut finals: BTreeMap<String, u64> = BTreeMap::new();
    let mut panicked_failures = 0u64;
    let mut commands_found = 0u64;
    let mut not_final_examples = Vec::new();
    let mut succeeded_after: HashMap<String, Vec<u64>> = HashMap::new();
    let mut samples = lock(&control.samples).clone();
    for sample in &mut samples {
        let i = (sample.t_ms / s.sample_interval.0.max(1)) as usize;
        let acked = i
            .checked_sub(1)
            .and_then(|b| stats.acked_per_bucket.get(b))
            .map_or(0, |c| c.load(Ordering::Relaxed));
        sample.telemetry_per_min = acked as f64 * 60_000.0 / s.sample_interval.0 as f64;
    }
    if !parents.is_empty() {
        for d in &devices {
            if deleted.contains(d.id.as_str()) {
                continue;
            }
            let cmds = reader
                .commands(d.id.as_str())
                .await
                .with_context(|| format!("reading {}'s commands", d.id))?;
            for c in cmds.iter().filter(|c| {
                c.parent_id
                    .as_ref()
                    .is_some_and(|p| parents.contains_key(p))
            }) {
                commands_found += 1;
                *finals.entry(c.state.clone()).or_default() += 1;
                let succeeded_at = c
                    .history
                    .iter()
                    .find(|(state, _)| state == CommandState::Succeeded.as_str())
                    .map(|(_, at)| *at);
                if let (Some(at), Some(parent)) = (succeeded_at, c.parent_id.as_ref()) {
                    let created = parents
                        .get(parent)
                        .and_then(|i| s.events.get(*i))
                        .map_or(epoch_ms, |e| epoch_ms + e.at.0);
                    succeeded_after
                        .entry(parent.clone())
                        .or_default()
                        .push(at.saturating_sub(created));
                }
                let is_final = CommandState::ALL
                    .iter()
                    .any(|st| st.is_final() && st.as_str() == c.state);
                if !is_final && not_final_examples.len() < LOST_EXAMPLES_MAX {
                    not_final_examples.push(format!("{} {}", d.id, c.state));
                }
                if c.state == CommandState::Failed.as_str()
                    && c.failed_reason
                        .as_deref()
                        .is_some_and(|why| why.starts_with("handler panicked"))
                {
                    panicked_failures += 1;
                }
                for sample in &mut samples {
                    let t_unix = epoch_ms + sample.t_ms;
                    // The state just before the mark, like the other series (the sampler reads
                    // before events scheduled at the mark).
                    if let Some((state, _)) = c.history.iter().rev().find(|(_, at)| *at < t_unix) {
                        *sample.commands.entry(state.clone()).or_default() += 1;
                    }
                }
            }
        }
    }
    let mut executed_twice = 0u64;
    let mut executed_once = 0u64;
    for d in &devices {
        for (_, n) in lock(&d.executions).iter() {
            match n {
                1 => executed_once += 1,
                0 => {}
                _ => executed_twice += 1,
            }
        }
    }
    let count = |st: CommandState| finals.get(st.as_str()).copied().unwrap_or(0);
    let commands_final: u64 = CommandState::ALL
        .iter()
        .filter(|s| s.is_final())
        .map(|s| count(*s))
        .sum();

    // Faults: injected vs. noticed.
    control.fault(
        "link_cut (drops, outages, cut_link)",
        st(&stats.cuts_injected),
        st(&stats.cuts_observed),
    );
    control.fault("link_drop", st(&stats.drops_injected), 0);
    control.fault("link_outage", st(&stats.outages_injected), 0);
    let restarts = st(&stats.power_losses_injected) + st(&stats.crashes_injected);
    control.fault("power_loss", st(&stats.power_losses_injected), 0);
    control.fault("firmware_crash", st(&stats.crashes_injected), 0);
    let ota_power_losses: u64 = lock(&stats.ota_power_losses.0).values().sum();
    control.fault("ota_power_loss (during an update)", ota_power_losses, 0);
    control.fault(
        "restart_recovered (power loss + crash + battery)",
        restarts + st(&stats.battery_recharged) + st(&stats.ota_reboots) + ota_power_losses,
        st(&stats.restarts_recovered),
    );
    control.fault(
        "battery_empty",
        st(&stats.battery_empty),
        st(&stats.battery_recharged),
    );
    let flash_failures: u64 = devices.iter().map(|d| d.flash.writes_failed_total()).sum();
    control.fault(
        "flash_write_failure",
        flash_failures,
        st(&stats.store_errors_surfaced),
    );
    control.fault(
        "command_handler_panic",
        st(&stats.handler_panics_injected),
        panicked_failures,
    );
    control.fault("agent_exit (supervisor gave up)", 0, st(&stats.agent_exits));
    let enroll_fired = [
        st(&stats.enroll_drops_before_request),
        st(&stats.enroll_drops_before_reply),
        st(&stats.enroll_kills),
        st(&stats.enroll_drops_before_first_connect),
    ];
    for (kind, fired) in device::FAULTS.iter().zip(enroll_fired) {
        let survived = enrollment
            .as_ref()
            .and_then(|e| e.survived_faults.get(*kind).copied())
            .unwrap_or(0);
        control.fault(kind, fired, survived);
    }
    let mut faults = lock(&control.faults).clone();
    faults.retain(|_, f| f.injected > 0 || f.detected > 0);

    let n = devices.len() as u64;
    let mut report = Report {
        scenario: s.name.clone(),
        seed: s.seed,
        devices: n,
        simulated_ms: s.duration.0,
        wall_ms: wall_start.elapsed().as_millis() as u64,
        rss_bytes: rss_end,
        rss_peak_bytes: rss_peak,
        rss_bytes_per_device: rss_end.saturating_sub(rss_base) / n.max(1),
        telemetry_sent,
        telemetry_input_dropped: st(&stats.telemetry_input_dropped),
        telemetry_acked,
        telemetry_stored,
        lost_acked_telemetry: lost,
        lost_examples,
        commands_sent,
        commands_succeeded: count(CommandState::Succeeded),
        commands_failed: count(CommandState::Failed),
        commands_expired: count(CommandState::Expired),
        commands_not_final: commands_found.saturating_sub(commands_final),
        commands_deleted: commands_sent.saturating_sub(commands_found),
        commands_not_final_examples: not_final_examples,
        commands_executed_once: executed_once,
        commands_executed_twice: executed_twice,
        jobs,
        reconnects,
        connects_refused_link_down: st(&stats.connects_refused_link_down),
        online_at_end,
        cluster_online_at_end,
        nodes,
        deleted_devices: deleted.len() as u64,
        faults,
        server_metrics,
        samples,
        events: lock(&control.event_log).clone(),
        timeline: measure::timeline(&control, &devices),
        enrollment,
        ota: ota_report,
        health: health_report,
        gateways: gateway_report,
        rollouts: rollout_reports,
        expectations: Vec::new(),
    };
    for event in &mut report.timeline {
        let Some(parent) = &event.fleet_command else {
            continue;
        };
        let mut delays = succeeded_after.remove(parent).unwrap_or_default();
        delays.sort_unstable();
        let at = |q: f64| {
            let i = ((delays.len().saturating_sub(1)) as f64 * q).round() as usize;
            delays.get(i).copied().unwrap_or(0)
        };
        event.completed = Some(Completed {
            wall_ms: lock(&control.fleet_done_wall_ms).get(parent).copied(),
            succeeded: delays.len() as u64,
            of: event.devices,
            median_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: delays.last().copied().unwrap_or(0),
        });
    }
    let errors = lock(&control.event_errors).clone();
    report.expectations = check_expectations(s, &report, &errors);
    Ok(report)
}
