//! One simulation run: start the server, register and boot the fleet, play the scenario's
//! events on virtual time, sample the fleet, then stop everything and measure against the store.
//!
//! Determinism: every device's randomness comes from (seed, device index); devices are spawned
//! in a fixed order; timestamps come from the virtual clock. Telemetry and command time series
//! are built from virtual timestamps recorded when things happened (ack times, command
//! history), not from queries racing the store, so the same seed gives the same report (wall
//! time and memory aside).

use crate::clock::VirtualClock;
use crate::device::{self, CohortModel, DeviceState, Net, Stats, SIM_CMD_KEY};
use crate::harness::InProcessServer;
use crate::remote::RemoteApi;
use crate::report::{ExpectationResult, FaultCount, Report, Sample};
use crate::scenario::{Action, Scenario, ServerTarget, SEQ_METRIC};
use anyhow::Context as _;
use mooring_proto::sync::{lock, read, write};
use mooring_proto::{Clock, DeviceId};
use mooring_server::app::{App, Readback};
use mooring_store::{CommandState, TelemetryQuery};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
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
    let paused = matches!(scenario.server, ServerTarget::InProcess);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(paused)
        .build()
        .context("building the simulator's runtime")?;
    rt.block_on(run(scenario, data_dir))
}

/// What the control tasks (events, sampler) share with the run.
struct Control {
    server: tokio::sync::Mutex<Option<InProcessServer>>,
    /// The running server's app; `None` while it is down. Never held across a shutdown.
    app: RwLock<Option<Arc<App>>>,
    net: Arc<Net>,
    data_dir: PathBuf,
    server_clock: Arc<dyn Clock>,
    /// (event index, fleet command id, devices targeted).
    fleet_commands: Mutex<Vec<(usize, String, u64)>>,
    event_log: Mutex<Vec<String>>,
    event_errors: Mutex<Vec<String>>,
    deleted: Mutex<HashSet<String>>,
    faults: Mutex<BTreeMap<String, FaultCount>>,
    samples: Mutex<Vec<Sample>>,
    /// Remote mode: the server's API (no in-process server then).
    remote: Option<Arc<RemoteApi>>,
}

impl Control {
    fn app(&self) -> Option<Arc<App>> {
        read(&self.app).clone()
    }

    fn set_app(&self, app: Option<Arc<App>>) {
        *write(&self.app) = app;
    }

    fn put_server(&self, s: &InProcessServer) {
        self.net.set_broker(s.server.app.broker().cloned());
        self.set_app(Some(s.server.app.clone()));
    }

    async fn online_count(&self) -> u64 {
        match &self.remote {
            Some(api) => api
                .metrics()
                .await
                .ok()
                .and_then(|m| m.get("mooring_devices_online").copied())
                .map_or(0, |v| v as u64),
            None => self.app().map_or(0, |a| a.presence.online_count() as u64),
        }
    }

    async fn server_metrics(&self) -> BTreeMap<String, f64> {
        match &self.remote {
            Some(api) => api.metrics().await.unwrap_or_default(),
            None => self
                .app()
                .map(|a| parse_metrics(&mooring_server::render_metrics(&a)))
                .unwrap_or_default(),
        }
    }

    async fn is_online(&self, id: &str) -> bool {
        match &self.remote {
            Some(api) => api.is_online(id).await.unwrap_or(false),
            None => self.app().is_some_and(|a| a.presence.get(id).0),
        }
    }

    fn fault(&self, kind: &str, injected: u64, detected: u64) {
        let mut f = lock(&self.faults);
        let e = f.entry(kind.to_owned()).or_default();
        e.injected += injected;
        e.detected += detected;
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
        ServerTarget::InProcess => None,
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
    let net = Arc::new(Net::new(clock, stats.clone()));
    let server = match &remote {
        Some(_) => None,
        None => Some(InProcessServer::start(data_dir, server_clock.clone()).await?),
    };
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
            match (&server, &remote, &creds_dir) {
                (Some(server), _, _) => server.register(dev.id.as_str(), c.tags.clone()).await?,
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
        server: tokio::sync::Mutex::new(None),
        app: RwLock::new(None),
        net: net.clone(),
        data_dir: data_dir.to_owned(),
        server_clock: server_clock.clone(),
        fleet_commands: Mutex::new(Vec::new()),
        event_log: Mutex::new(Vec::new()),
        event_errors: Mutex::new(Vec::new()),
        deleted: Mutex::new(HashSet::new()),
        faults: Mutex::new(BTreeMap::new()),
        samples: Mutex::new(Vec::new()),
        remote: remote.clone(),
    });
    if let Some(server) = server {
        control.put_server(&server);
        *control.server.lock().await = Some(server);
    }
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
    let rss_end = rss_bytes("VmRSS:");
    let rss_peak = rss_bytes("VmHWM:");
    let st = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let telemetry_sent = st(&stats.telemetry_sent);
    let telemetry_acked = st(&stats.telemetry_acked);

    // Stop the fleet and the control tasks, then the server (gracefully: the writer drains).
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    fleet.abort_all();
    while fleet.join_next().await.is_some() {}
    let reader = match &remote {
        Some(api) => Reader::Remote(api.clone()),
        None => {
            let server = control.server.lock().await.take();
            net.set_broker(None);
            control.set_app(None);
            let server = match server {
                Some(s) => s,
                // The run ended during a server restart's downtime: open the data dir to read it.
                None => InProcessServer::start(data_dir, server_clock.clone()).await?,
            };
            let readback = server.server.app.readback();
            server.shutdown().await;
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
                    if let Some((state, _)) = c.history.iter().rev().find(|(_, at)| *at <= t_unix) {
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
    control.fault(
        "restart_recovered (power loss + crash + battery)",
        restarts + st(&stats.battery_recharged),
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
        reconnects,
        connects_refused_link_down: st(&stats.connects_refused_link_down),
        online_at_end,
        deleted_devices: deleted.len() as u64,
        faults,
        server_metrics,
        samples,
        events: lock(&control.event_log).clone(),
        expectations: Vec::new(),
    };
    let errors = lock(&control.event_errors).clone();
    report.expectations = check_expectations(s, &report, &errors);
    Ok(report)
}

/// Plays the scenario's events at their times.
async fn run_events(
    s: Scenario,
    control: Arc<Control>,
    devices: Vec<Arc<DeviceState>>,
    start: Instant,
) {
    let mut events: Vec<(usize, &crate::scenario::Event)> = s.events.iter().enumerate().collect();
    events.sort_by_key(|(i, e)| (e.at, *i));
    for (i, e) in events {
        tokio::time::sleep_until(start + e.at.as_std()).await;
        let at = fmt_ms(e.at.0);
        match &e.action {
            Action::Command {
                to,
                name,
                params,
                ttl,
            } => {
                let mut params = match params {
                    serde_json::Value::Null => serde_json::Map::new(),
                    serde_json::Value::Object(m) => m.clone(),
                    _ => {
                        control.error(format!(
                            "event {i} (command at {at}): params must be an object"
                        ));
                        continue;
                    }
                };
                params.insert(SIM_CMD_KEY.into(), serde_json::Value::from(i));
                let created = match (&control.remote, control.app()) {
                    (Some(api), _) => api
                        .fleet_command(
                            to,
                            name,
                            serde_json::Value::Object(params),
                            ttl.map(|t| t.0 / 1000),
                        )
                        .await
                        .map_err(|e| format!("{e:#}")),
                    (None, Some(app)) => {
                        let c = mooring_server::commands::NewCommand {
                            name: name.clone(),
                            params: serde_json::Value::Object(params),
                            ttl_secs: ttl.map(|t| t.0 / 1000),
                            max_attempts: None,
                            idempotency_key: None,
                            result_timeout_secs: None,
                        };
                        app.commands
                            .create_fleet_command(to, c)
                            .await
                            .map(|v| (v.parent.id.clone(), v.parent.total))
                            .map_err(|e| e.to_string())
                    }
                    (None, None) => Err("the server is down".to_owned()),
                };
                match created {
                    Ok((id, total)) => {
                        control.log(format!("{at}: command {name} to {to:?}: {total} devices"));
                        lock(&control.fleet_commands).push((i, id, total));
                    }
                    Err(err) => control.error(format!("event {i} (command at {at}): {err}")),
                }
            }
            Action::CutLink { region, duration } => {
                let until = control.net.clock.elapsed_ms() + duration.0;
                let mut hit = 0u64;
                for d in devices
                    .iter()
                    .filter(|d| region.is_empty() || s.cohorts[d.cohort].region == *region)
                {
                    d.link.cut(until, &control.net.stats);
                    hit += 1;
                }
                let what = if region.is_empty() {
                    "all regions".to_owned()
                } else {
                    format!("region {region}")
                };
                control.log(format!(
                    "{at}: cut_link {what} for {}: {hit} devices",
                    fmt_ms(duration.0)
                ));
                control.fault("cut_link (devices)", hit, 0);
            }
            Action::DeleteDevice { device } => {
                let (device, deleted) = match (&control.remote, control.app()) {
                    (Some(api), _) => {
                        let id = api.device_id(device);
                        let r = api.delete_device(&id).await.map_err(|e| format!("{e:#}"));
                        (id, r)
                    }
                    (None, Some(app)) => (
                        device.clone(),
                        app.registry
                            .delete_device(device)
                            .await
                            .map_err(|e| e.to_string()),
                    ),
                    (None, None) => (device.clone(), Err("the server is down".to_owned())),
                };
                match deleted {
                    Ok(()) => {
                        control.log(format!("{at}: deleted device {device}"));
                        lock(&control.deleted).insert(device.clone());
                        control.fault("delete_device", 1, 0);
                    }
                    Err(err) => control.error(format!("event {i} (delete_device at {at}): {err}")),
                }
            }
            Action::Retag { to, tags } => {
                let Some(app) = control.app().filter(|_| control.remote.is_none()) else {
                    control.error(format!(
                        "event {i} (retag at {at}): needs the in-process server, running"
                    ));
                    continue;
                };
                match retag(&app, to, tags).await {
                    Ok(n) => {
                        control.log(format!("{at}: retag {to:?} -> {tags:?}: {n} devices"));
                        control.fault("retag", n, 0);
                    }
                    Err(err) => control.error(format!("event {i} (retag at {at}): {err}")),
                }
            }
            Action::RestartServer { .. } if control.remote.is_some() => {
                control.error(format!(
                    "event {i} (restart_server at {at}): needs the in-process server (remote mode cannot restart a server)"
                ));
            }
            Action::RestartServer { downtime } => {
                let old = control.server.lock().await.take();
                control.net.set_broker(None);
                control.set_app(None);
                if let Some(old) = old {
                    old.shutdown().await;
                }
                tokio::time::sleep(downtime.as_std()).await;
                match InProcessServer::start(&control.data_dir, control.server_clock.clone()).await
                {
                    Ok(new) => {
                        control.put_server(&new);
                        *control.server.lock().await = Some(new);
                        control.log(format!(
                            "{at}: server restarted after {} down",
                            fmt_ms(downtime.0)
                        ));
                        control.fault("server_restart", 1, 1);
                    }
                    Err(err) => {
                        control.error(format!("event {i} (restart_server at {at}): {err:#}"));
                        return;
                    }
                }
            }
        }
    }
}

/// How long before each sample mark the sampler reads.
const SAMPLE_LEAD: Duration = Duration::from_millis(1);

/// Samples the fleet every `interval` (online devices as the server sees them); the telemetry
/// and command series are filled in at the end from recorded times.
async fn run_sampler(control: Arc<Control>, start: Instant, end: Instant, interval: Duration) {
    let mut k = 1u32;
    loop {
        let t = start + interval * k;
        if t > end {
            return;
        }
        // Read 1 ms before the mark, so events scheduled at the mark (scenario events are
        // whole seconds) are never racing the read.
        tokio::time::sleep_until(t - SAMPLE_LEAD).await;
        let online = control.online_count().await;
        lock(&control.samples).push(Sample {
            t_ms: (interval * k).as_millis() as u64,
            online,
            ..Sample::default()
        });
        k += 1;
    }
}

/// Where the end-of-run numbers come from: the in-process server's store (after it stopped),
/// or the remote server's API.
enum Reader {
    /// Read after the server stopped, so only the store can answer (see `App::readback`).
    Store(Readback),
    Remote(Arc<RemoteApi>),
}

/// A command as the end of the run needs it.
struct CommandView {
    state: String,
    parent_id: Option<String>,
    failed_reason: Option<String>,
    history: Vec<(String, u64)>,
}

impl Reader {
    async fn telemetry_values(&self, id: &str, limit: usize) -> anyhow::Result<Vec<u32>> {
        match self {
            Reader::Remote(api) => api.telemetry_values(id, limit).await,
            Reader::Store(store) => Ok(store
                .telemetry(TelemetryQuery {
                    device_id: id.to_owned(),
                    metric: Some(SEQ_METRIC.to_owned()),
                    from_ms: None,
                    to_ms: None,
                    limit,
                })
                .await?
                .iter()
                .filter_map(|p| match p.value {
                    mooring_proto::telemetry::MetricValue::Number(v) => Some(v as u32),
                    mooring_proto::telemetry::MetricValue::Bool(_) => None,
                })
                .collect()),
        }
    }

    async fn commands(&self, id: &str) -> anyhow::Result<Vec<CommandView>> {
        match self {
            Reader::Remote(api) => Ok(api
                .commands(id)
                .await?
                .into_iter()
                .map(|c| CommandView {
                    state: c.state,
                    parent_id: c.parent_id,
                    failed_reason: c.failed_reason,
                    history: c.history,
                })
                .collect()),
            Reader::Store(store) => Ok(store
                .commands(id, COMMANDS_PER_DEVICE_MAX)
                .await?
                .into_iter()
                .map(|c| CommandView {
                    state: c.state.as_str().to_owned(),
                    failed_reason: (c.state == CommandState::Failed)
                        .then(|| {
                            c.result.as_ref()?.output["reason"]
                                .as_str()
                                .map(str::to_owned)
                        })
                        .flatten(),
                    parent_id: c.parent_id,
                    history: c
                        .history
                        .iter()
                        .map(|(s, at)| (s.as_str().to_owned(), *at))
                        .collect(),
                })
                .collect()),
        }
    }
}

fn fmt_ms(ms: u64) -> String {
    match ms {
        m if m % 3_600_000 == 0 && m > 0 => format!("{}h", m / 3_600_000),
        m if m % 60_000 == 0 && m > 0 => format!("{}m", m / 60_000),
        m if m % 1_000 == 0 => format!("{}s", m / 1_000),
        m => format!("{m}ms"),
    }
}

/// Prometheus text → `name{labels}` → value (comments skipped).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.trim().to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Replaces the tags of every device matching `selector`; returns how many were retagged.
async fn retag(app: &App, selector: &str, tags: &BTreeMap<String, String>) -> Result<u64, String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let (page, next) = app
            .registry
            .list_selected_devices(selector, Some(1000), cursor.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        ids.extend(page.into_iter().map(|v| v.record.id));
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    for id in &ids {
        app.registry
            .set_tags(id, tags.clone())
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(ids.len() as u64)
}

fn check_expectations(s: &Scenario, r: &Report, event_errors: &[String]) -> Vec<ExpectationResult> {
    let e = &s.expect;
    let mut out = Vec::new();
    let mut at_most = |name: &str, want: Option<u64>, got: u64| {
        if let Some(w) = want {
            out.push(ExpectationResult {
                name: name.into(),
                expected: format!("<= {w}"),
                actual: got.to_string(),
                ok: got <= w,
            });
        }
    };
    at_most(
        "lost_acked_telemetry",
        e.lost_acked_telemetry,
        r.lost_acked_telemetry,
    );
    at_most(
        "commands_executed_twice",
        e.commands_executed_twice,
        r.commands_executed_twice,
    );
    for (reason, max) in &e.max_mqtt_refusals {
        let key = format!("mooring_mqtt_refusals_total{{reason=\"{reason}\"}}");
        let got = r.server_metrics.get(&key).copied().unwrap_or(0.0) as u64;
        at_most(&format!("max_mqtt_refusals.{reason}"), Some(*max), got);
    }
    at_most(
        "max_commands_not_succeeded",
        e.max_commands_not_succeeded,
        r.commands_sent
            .saturating_sub(r.commands_deleted)
            .saturating_sub(r.commands_succeeded),
    );
    let mut at_least = |name: &str, want: Option<u64>, got: u64| {
        if let Some(w) = want {
            out.push(ExpectationResult {
                name: name.into(),
                expected: format!(">= {w}"),
                actual: got.to_string(),
                ok: got >= w,
            });
        }
    };
    at_least(
        "min_online_at_end",
        e.min_online_at_end.map(|v| v as u64),
        r.online_at_end,
    );
    at_least(
        "min_telemetry_stored",
        e.min_telemetry_stored,
        r.telemetry_stored,
    );
    at_least(
        "min_commands_succeeded",
        e.min_commands_succeeded,
        r.commands_succeeded,
    );
    for err in event_errors {
        out.push(ExpectationResult {
            name: "event".into(),
            expected: "applied".into(),
            actual: err.clone(),
            ok: false,
        });
    }
    out
}
