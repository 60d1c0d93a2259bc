//! A device's life: boot the agent, feed it telemetry, and inject power losses, crashes, link
//! faults and an empty battery on the virtual clock.

use super::{
    derive_seed, inc, CohortModel, DeviceState, LedgerStore, Net, SimConnector, SimHandler,
    BOOT_GRID_MS, INPUT_QUEUE_MAX, SALT_AGENT, SALT_DEVICE, SALT_HANDLER,
};
use crate::scenario::{Cohort, MetricModel, LINK_BY_VERSION_CHECK_MS, SEQ_METRIC};
use mooring_agent::{AgentDeps, CommandHandler};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Map, Value};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Poisson arrivals: the time until the next one, for `per_day` expected per simulated day.
fn next_arrival(rng: &mut StdRng, per_day: f64) -> Option<Duration> {
    if per_day <= 0.0 {
        return None;
    }
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    let ms = -u.ln() * 86_400_000.0 / per_day;
    Some(Duration::from_millis(ms.max(1.0) as u64))
}

struct Agent {
    task: JoinSet<anyhow::Result<()>>,
    input: mpsc::Sender<Map<String, Value>>,
    boots: u64,
    /// `connects_total` when the current agent started (to see that a restart recovered).
    connects_at_boot: u64,
    recovered: bool,
}

/// The device's life: boot, generate telemetry, suffer faults, until the run ends (the caller
/// aborts the task). `start` is virtual time zero; `end` stops telemetry generation.
pub async fn run_device(
    dev: Arc<DeviceState>,
    model: Arc<CohortModel>,
    net: Arc<Net>,
    seed: u64,
    start: Instant,
    end: Instant,
) {
    let c = &model.cohort;
    let mut rng = StdRng::seed_from_u64(derive_seed(seed, dev.index as u64, SALT_DEVICE));
    let offset = rng.random_range(0..=c.connect_spread.0 / BOOT_GRID_MS) * BOOT_GRID_MS;
    tokio::time::sleep_until(start + Duration::from_millis(offset)).await;
    if !super::enroll_device(&dev, &model, &net, seed).await {
        return; // refused for good: nothing to run
    }
    let stats = net.stats.clone();
    let mut agent = Agent {
        task: JoinSet::new(),
        input: mpsc::channel(1).0,
        boots: 0,
        connects_at_boot: 0,
        recovered: true,
    };
    boot(&mut agent, &dev, &model, &net, seed);
    let never = end + Duration::from_secs(86_400 * 365);
    let after = |rng: &mut StdRng, per_day: f64| {
        next_arrival(rng, per_day).map_or(never, |d| Instant::now() + d)
    };
    let mut next_msg = Instant::now();
    // The link's faults follow the version the device committed (`link_by_version`).
    let watch_version = dev
        .ota
        .as_ref()
        .is_some_and(|o| !o.model.link_by_version.is_empty());
    let mut committed = dev.ota.as_ref().and_then(|o| o.committed_version());
    let mut link = link_faults(c, &dev, committed.as_deref());
    let mut next_drop = after(&mut rng, link.drops_per_day);
    let mut next_outage = after(&mut rng, link.outages_per_day);
    let mut next_version_check = Instant::now();
    let mut next_power_loss = after(&mut rng, c.power_loss_per_day);
    let mut next_crash = after(&mut rng, c.crash_per_day);
    let mut battery = c.battery.as_ref().map(|b| b.start_pct);
    let mut battery_at = Instant::now();
    let mut powered = true;
    let interval = c.telemetry_interval.as_std();
    loop {
        if watch_version && Instant::now() >= next_version_check {
            next_version_check = Instant::now() + Duration::from_millis(LINK_BY_VERSION_CHECK_MS);
            let now_committed = dev.ota.as_ref().and_then(|o| o.committed_version());
            if now_committed != committed {
                // Arrivals are memoryless: drawing anew from now at the new rates is exact.
                committed = now_committed;
                link = link_faults(c, &dev, committed.as_deref());
                next_drop = after(&mut rng, link.drops_per_day);
                next_outage = after(&mut rng, link.outages_per_day);
            }
        }
        // When the battery crosses a threshold (empty while on, 5 % while off).
        let next_battery = match (&c.battery, battery) {
            (Some(b), Some(level)) => {
                let rate = if powered {
                    b.charge_pct_per_hour - b.drain_pct_per_hour
                } else {
                    b.charge_pct_per_hour
                };
                let target = if powered { 0.0 } else { BATTERY_ON_PCT };
                let hours = if powered && rate < 0.0 {
                    Some(level / -rate)
                } else if !powered && rate > 0.0 {
                    Some(((target - level) / rate).max(0.0))
                } else {
                    None
                };
                hours.map_or(never, |h| {
                    battery_at + Duration::from_millis((h * 3_600_000.0).ceil() as u64 + 1)
                })
            }
            _ => never,
        };
        let msg_at = if powered { next_msg } else { never };
        if let Some(ota) = &dev.ota {
            ota.set_battery(battery);
        }
        let ota_loss = dev
            .ota
            .as_ref()
            .and_then(|o| o.loss_at_ms())
            .map_or(never, |ms| start + Duration::from_millis(ms));
        let wake = [
            msg_at,
            next_drop,
            next_outage,
            next_power_loss,
            next_crash,
            next_battery,
            ota_loss,
            if watch_version {
                next_version_check
            } else {
                never
            },
        ]
        .into_iter()
        .min()
        .unwrap_or(never);
        let reboot = async {
            match &dev.ota {
                Some(o) => o.reboot.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            () = reboot => {
                // The updater rebooted the device (into its trial, or back): a clean reboot,
                // its flash synced.
                kill(&mut agent).await;
                tokio::time::sleep(c.boot_delay.as_std()).await;
                if powered {
                    boot(&mut agent, &dev, &model, &net, seed);
                }
                continue;
            }
            joined = agent.task.join_next(), if !agent.task.is_empty() => {
                // The agent stopped on its own (its supervisor gave up): the service manager
                // restarts it, like systemd's Restart=always.
                if let Some(Ok(Err(e))) = &joined {
                    tracing::debug!(device = %dev.id, error = %e, "agent exited");
                }
                inc(&stats.agent_exits);
                tokio::time::sleep(c.boot_delay.as_std()).await;
                if powered {
                    boot(&mut agent, &dev, &model, &net, seed);
                }
                continue;
            }
        }
        let now = Instant::now();
        if !agent.recovered && dev.connects_total() > agent.connects_at_boot {
            agent.recovered = true;
            inc(&stats.restarts_recovered);
        }
        if let (Some(b), Some(level)) = (&c.battery, battery.as_mut()) {
            let hours = now.duration_since(battery_at).as_secs_f64() / 3600.0;
            let rate = if powered {
                b.charge_pct_per_hour - b.drain_pct_per_hour
            } else {
                b.charge_pct_per_hour
            };
            *level = (*level + rate * hours).clamp(0.0, 100.0);
            battery_at = now;
            if powered && *level <= 0.0 {
                inc(&stats.battery_empty);
                powered = false;
                kill(&mut agent).await;
                dev.flash.power_loss();
            } else if !powered && *level >= BATTERY_ON_PCT {
                inc(&stats.battery_recharged);
                powered = true;
                tokio::time::sleep(c.boot_delay.as_std()).await;
                boot(&mut agent, &dev, &model, &net, seed);
                next_msg = Instant::now();
            }
        }
        if now >= next_drop {
            inc(&stats.drops_injected);
            dev.link.cut(0, &stats);
            next_drop = after(&mut rng, link.drops_per_day);
        }
        if now >= next_outage {
            inc(&stats.outages_injected);
            let until = net.clock.elapsed_ms() + link.outage_duration_ms;
            dev.link.cut(until, &stats);
            next_outage = after(&mut rng, link.outages_per_day);
        }
        if now >= next_power_loss {
            next_power_loss = after(&mut rng, c.power_loss_per_day);
            if powered {
                inc(&stats.power_losses_injected);
                kill(&mut agent).await;
                dev.flash.power_loss();
                tokio::time::sleep(c.boot_delay.as_std()).await;
                boot(&mut agent, &dev, &model, &net, seed);
            }
        }
        if let Some(ota) = &dev.ota {
            if ota.take_due_loss(net.clock.elapsed_ms()) && powered {
                // Only a loss that hits an update in progress counts (and happens).
                if let Some(phase) = ota.phase_in_progress() {
                    stats.ota_power_losses.add(&phase);
                    kill(&mut agent).await;
                    dev.flash.power_loss();
                    tokio::time::sleep(c.boot_delay.as_std()).await;
                    boot(&mut agent, &dev, &model, &net, seed);
                }
            }
        }
        if now >= next_crash {
            next_crash = after(&mut rng, c.crash_per_day);
            if powered {
                inc(&stats.crashes_injected);
                kill(&mut agent).await;
                tokio::time::sleep(c.boot_delay.as_std()).await;
                boot(&mut agent, &dev, &model, &net, seed);
            }
        }
        if powered && Instant::now() >= next_msg {
            next_msg += interval;
            while next_msg <= Instant::now() {
                next_msg += interval; // slept through (rebooting): those readings never existed
            }
            if Instant::now() < end {
                let n = dev.generated.fetch_add(1, Ordering::Relaxed) + 1;
                let obj = telemetry(c, &mut rng, n, battery);
                match agent.input.try_send(obj) {
                    Ok(()) => inc(&stats.telemetry_sent),
                    Err(_) => inc(&stats.telemetry_input_dropped),
                }
            }
        }
    }
}

/// A device's link faults now: its cohort's `[cohort.link]`, with what `[cohort.ota]
/// link_by_version` gives for the version it committed.
struct LinkFaults {
    drops_per_day: f64,
    outages_per_day: f64,
    outage_duration_ms: u64,
}

fn link_faults(c: &Cohort, dev: &DeviceState, committed: Option<&str>) -> LinkFaults {
    let mut l = LinkFaults {
        drops_per_day: c.link.drops_per_day,
        outages_per_day: c.link.outages_per_day,
        outage_duration_ms: c.link.outage_duration.0,
    };
    let by_version = committed.and_then(|v| dev.ota.as_ref()?.model.link_by_version.get(v));
    if let Some(v) = by_version {
        l.drops_per_day = v.drops_per_day.unwrap_or(l.drops_per_day);
        l.outages_per_day = v.outages_per_day.unwrap_or(l.outages_per_day);
        l.outage_duration_ms = v.outage_duration.map_or(l.outage_duration_ms, |d| d.0);
    }
    l
}

/// A device whose battery was empty turns on again above this level.
pub const BATTERY_ON_PCT: f64 = 5.0;

fn telemetry(c: &Cohort, rng: &mut StdRng, n: u64, battery: Option<f64>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(SEQ_METRIC.into(), Value::from(n));
    for (name, model) in &c.metrics {
        let v = match model {
            MetricModel::Gauge { mean, jitter } => {
                let x = if *jitter > 0.0 {
                    rng.random_range(-jitter..=*jitter)
                } else {
                    0.0
                };
                Value::from(((mean + x) * 1000.0).round() / 1000.0)
            }
            MetricModel::Counter { per_message } => Value::from(per_message * n as f64),
            MetricModel::Flag { rate } => Value::from(rng.random_bool(rate.clamp(0.0, 1.0))),
        };
        m.insert(name.clone(), v);
    }
    if let Some(b) = battery {
        m.insert("battery.pct".into(), Value::from((b * 10.0).round() / 10.0));
    }
    m
}

/// Aborts the agent wherever it is (no goodbye, no flush) and waits until it is gone.
async fn kill(agent: &mut Agent) {
    agent.task.abort_all();
    while agent.task.join_next().await.is_some() {}
}

fn boot(
    agent: &mut Agent,
    dev: &Arc<DeviceState>,
    model: &Arc<CohortModel>,
    net: &Arc<Net>,
    seed: u64,
) {
    debug_assert!(agent.task.is_empty(), "one agent per device");
    let (tx, rx) = mpsc::channel(INPUT_QUEUE_MAX);
    let boot_no = agent.boots;
    agent.boots += 1;
    if boot_no > 0 {
        agent.recovered = false;
        agent.connects_at_boot = dev.connects_total();
    }
    let mut handlers = mooring_agent::Handlers::new();
    for name in &model.command_names {
        let h: Arc<dyn CommandHandler> = Arc::new(SimHandler {
            dev: dev.clone(),
            panic_rate: model.cohort.command_panic_rate,
            rng: Mutex::new(StdRng::seed_from_u64(derive_seed(
                seed,
                dev.index as u64,
                SALT_HANDLER.wrapping_add(boot_no << 8),
            ))),
            stats: net.stats.clone(),
        });
        handlers.insert(name.clone(), h);
    }
    let deps = AgentDeps {
        device_id: dev.id.clone(),
        connector: Arc::new(SimConnector {
            index: dev.index,
            link: dev.link.clone(),
            net: net.clone(),
            tls: dev.tls.clone(),
            claim: false,
            probe: dev.enroll.clone(),
        }),
        store: Box::new(LedgerStore {
            inner: dev.flash.clone(),
            dev: dev.clone(),
            stats: net.stats.clone(),
            clock: net.clock,
        }),
        clock: model.clock.clone(),
        rng_seed: derive_seed(
            seed,
            dev.index as u64,
            SALT_AGENT.wrapping_add(boot_no << 8),
        ),
        metrics: Box::new(mooring_agent::NoMetrics),
        input: Some(rx),
        handlers,
        diagnostics: dev.diag.clone(),
        ota: None,
        ota_platform: None,
        child_transport: dev.gateway.as_ref().map(|g| {
            let t: Box<dyn mooring_agent::gateway::ChildTransport> =
                Box::new(super::gateway::SimChildren {
                    children: g.clone(),
                    stats: net.stats.clone(),
                    clock: net.clock,
                });
            t
        }),
    };
    let mut deps = deps;
    if let (Some(ota), Some(update)) = (&dev.ota, &model.agent_config.update) {
        // Power on: the bootloader picks a slot (a trial's one chance, or back to the
        // committed one), then the updater resumes from its journal.
        let started = update
            .settings()
            .map_err(anyhow::Error::msg)
            .and_then(|settings| {
                Ok(mooring_agent::ota::Updater::start(
                    settings,
                    Box::new(ota.slots.clone()),
                    Box::new(ota.files.clone()),
                )?)
            });
        match started {
            Ok(up) => {
                deps.ota = Some(up);
                deps.ota_platform = Some(Arc::new(super::ota::SimPlatform {
                    dev: dev.clone(),
                    net: net.clone(),
                }));
            }
            Err(e) => {
                tracing::warn!(device = %dev.id, error = %format!("{e:#}"), "updater did not start")
            }
        }
    }
    agent.input = tx;
    agent.task.spawn(mooring_agent::run_with(
        deps,
        model.agent_config.clone(),
        std::future::pending(),
    ));
}
