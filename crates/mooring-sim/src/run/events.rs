//! The scenario's events played at their times, through the server's own services (or the
//! remote server's API): fleet commands, link cuts, device deletion, retagging, restarts, and
//! in cluster mode killing and restarting nodes.

use super::{cluster_counters, parse_metrics, Control};
use crate::device::{DeviceState, SIM_CMD_KEY};
use crate::harness::node_id;
use crate::report::{LeaseMove, TimelineEvent};
use crate::scenario::{Action, DurationMs, Scenario};
use mooring_proto::sync::lock;
use mooring_proto::Clock;
use mooring_server::app::App;
use mooring_server::jobs::JobAction;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::time::Instant;

/// Plays the scenario's events at their times; each one's outcome goes on the run's timeline.
pub(super) async fn run_events(
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
        let (target, detail) = describe(&e.action);
        let mut ev = TimelineEvent {
            at_ms: e.at.0,
            action: e.action.name().to_owned(),
            target,
            detail,
            ..TimelineEvent::default()
        };
        let mut watch = None;
        let outcome = match &e.action {
            Action::Command {
                to,
                name,
                params,
                ttl,
            } => command(&control, i, to, name, params, *ttl)
                .await
                .map(|total| {
                    control.log(format!("{at}: command {name} to {to:?}: {total} devices"));
                    ev.devices = total;
                    ev.fleet_command = lock(&control.fleet_commands)
                        .last()
                        .map(|(_, id, _)| id.clone());
                    if let (Some(id), None) = (&ev.fleet_command, &control.remote) {
                        tokio::spawn(watch_fleet_command(Arc::clone(&control), id.clone()));
                    }
                }),
            Action::CutLink { region, duration } => {
                let until = control.net.clock.elapsed_ms() + duration.0;
                let mut hit = Vec::new();
                for d in devices
                    .iter()
                    .filter(|d| region.is_empty() || s.cohorts[d.cohort].region == *region)
                {
                    d.link.cut(until, &control.net.stats);
                    d.link.await_reconnect(until);
                    hit.push(d.index);
                }
                control.log(format!(
                    "{at}: cut_link {} for {}: {} devices",
                    ev.target,
                    fmt_ms(duration.0),
                    hit.len()
                ));
                control.fault("cut_link (devices)", hit.len() as u64, 0);
                ev.devices = hit.len() as u64;
                ev.until_ms = Some(until);
                watch = Some((until, hit));
                Ok(())
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
                            .delete_device(&mooring_server::access::Access::all(), device)
                            .await
                            .map_err(|e| e.to_string()),
                    ),
                    (None, None) => (device.clone(), Err("the server is down".to_owned())),
                };
                ev.target = device.clone();
                deleted.map(|()| {
                    control.log(format!("{at}: deleted device {device}"));
                    lock(&control.deleted).insert(device);
                    control.fault("delete_device", 1, 0);
                    ev.devices = 1;
                })
            }
            Action::Retag { to, tags } => {
                match control.app().filter(|_| control.remote.is_none()) {
                    None => Err("needs the in-process server, running".to_owned()),
                    Some(app) => retag(&app, to, tags).await.map(|n| {
                        control.log(format!("{at}: retag {to:?} -> {tags:?}: {n} devices"));
                        control.fault("retag", n, 0);
                        ev.devices = n;
                    }),
                }
            }
            Action::TagJob { to, tags } => match control.app() {
                None => Err("needs a running server".to_owned()),
                Some(app) => create_job(&app, to, JobAction::Tag(tags.clone()))
                    .await
                    .map(|id| {
                        control.log(format!("{at}: tag_job {to:?} -> {tags:?}: job {id}"));
                        ev.detail = format!("{} ({id})", ev.detail);
                        lock(&control.jobs).push(id);
                    }),
            },
            Action::ReportJob {
                to,
                since,
                until,
                metrics,
            } => match control.app() {
                None => Err("needs a running server".to_owned()),
                Some(app) => {
                    let clock = &control.net.clock;
                    let epoch_ms = clock.now_ms().saturating_sub(clock.elapsed_ms());
                    let spec = mooring_server::reports::ReportSpec::from_request(
                        "telemetry",
                        "csv",
                        epoch_ms + since.0,
                        epoch_ms + until.0,
                        metrics.clone(),
                    );
                    match spec {
                        Err(e) => Err(e.to_string()),
                        Ok(spec) => create_job(&app, to, JobAction::Report(spec))
                            .await
                            .map(|id| {
                                control.log(format!("{at}: report_job {to:?}: job {id}"));
                                ev.detail = format!("{} ({id})", ev.detail);
                                lock(&control.jobs).push(id);
                            }),
                    }
                }
            },
            Action::RestartServer { .. } if control.remote.is_some() => {
                Err("needs the in-process server (remote mode cannot restart a server)".to_owned())
            }
            Action::RestartServer { downtime } => {
                for j in control.job_reports().await {
                    if j.state == "running" || j.state == "queued" {
                        control.log(format!(
                            "{at}: job {} is {} at {}/{} devices as the server stops",
                            j.id,
                            j.state,
                            j.done,
                            j.total.map_or_else(|| "?".to_owned(), |t| t.to_string())
                        ));
                    }
                }
                let old = control
                    .servers
                    .lock()
                    .await
                    .first_mut()
                    .and_then(Option::take);
                control.net.set_broker(None);
                control.set_app(0, None);
                if let Some(old) = old {
                    old.shutdown().await;
                }
                tokio::time::sleep(downtime.as_std()).await;
                match control.start_server(0).await {
                    Ok(new) => {
                        control.put_server(0, &new);
                        if let Some(slot) = control.servers.lock().await.first_mut() {
                            *slot = Some(new);
                        }
                        control.log(format!(
                            "{at}: server restarted after {} down",
                            fmt_ms(downtime.0)
                        ));
                        control.fault("server_restart", 1, 1);
                        let back = control.net.clock.elapsed_ms();
                        let deleted = lock(&control.deleted).clone();
                        let expected: Vec<usize> = devices
                            .iter()
                            .filter(|d| !deleted.contains(d.id.as_str()))
                            .map(|d| {
                                d.link.await_reconnect(back);
                                d.index
                            })
                            .collect();
                        ev.devices = expected.len() as u64;
                        ev.until_ms = Some(back);
                        watch = Some((back, expected));
                        Ok(())
                    }
                    Err(err) => Err(format!("{err:#}")),
                }
            }
            Action::OtaDeploy {
                version,
                to,
                allow_downgrade,
            } => super::ota::deploy(&control, version, to, *allow_downgrade)
                .await
                .map(|d| {
                    control.log(format!(
                        "{at}: ota_deploy {version} to {to:?}: deployment {} to {} devices",
                        d.id, d.devices
                    ));
                    ev.devices = d.devices;
                    ev.detail = format!("{} ({})", ev.detail, d.id);
                }),
            Action::Rollout(r) => super::rollouts::create(&control, r, s.seed, e.at.0)
                .await
                .map(|v| {
                    control.log(format!(
                        "{at}: rollout {} to {:?}: {} ({} devices, waves {}, control {}%)",
                        r.version,
                        r.to,
                        v.id,
                        v.total,
                        v.spec
                            .waves
                            .as_deref()
                            .unwrap_or_default()
                            .iter()
                            .map(|w| format!("{w}%"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        v.spec.control_pct.unwrap_or_default()
                    ));
                    ev.devices = v.total;
                    ev.detail = format!("{} ({})", ev.detail, v.id);
                    lock(&control.watchers)
                        .spawn(super::rollouts::watch(control.clone(), v.id.clone()));
                }),
            Action::KillNode { node } => {
                kill_node(&control, &devices, *node, e.at.0)
                    .await
                    .map(|(hit, since)| {
                        control.log(format!(
                            "{at}: {} killed with {} devices connected",
                            ev.target,
                            hit.len()
                        ));
                        ev.devices = hit.len() as u64;
                        watch = Some((since, hit));
                    })
            }
            Action::RestartNode { node } => restart_node(&control, *node).await.map(|()| {
                control.log(format!("{at}: {} started again", ev.target));
            }),
        };
        let server_lost = matches!(e.action, Action::RestartServer { .. })
            && outcome.is_err()
            && control.remote.is_none();
        if let Err(err) = outcome {
            control.error(format!("event {i} ({} at {at}): {err}", ev.action));
            ev.error = Some(err);
        }
        control.happened(ev, watch);
        if server_lost {
            // Nothing more can be played without a server.
            return;
        }
    }
}

/// Creates the fleet command of event `i`; returns how many devices it targets.
async fn command(
    control: &Control,
    i: usize,
    to: &str,
    name: &str,
    params: &serde_json::Value,
    ttl: Option<DurationMs>,
) -> Result<u64, String> {
    let mut params = match params {
        serde_json::Value::Null => serde_json::Map::new(),
        serde_json::Value::Object(m) => m.clone(),
        _ => return Err("params must be an object".to_owned()),
    };
    params.insert(SIM_CMD_KEY.into(), serde_json::Value::from(i));
    let (id, total) = match (&control.remote, control.app()) {
        (Some(api), _) => api
            .fleet_command(
                to,
                name,
                serde_json::Value::Object(params),
                ttl.map(|t| t.0 / 1000),
            )
            .await
            .map_err(|e| format!("{e:#}"))?,
        (None, Some(app)) => {
            let c = mooring_server::commands::NewCommand {
                name: name.to_owned(),
                params: serde_json::Value::Object(params),
                ttl_secs: ttl.map(|t| t.0 / 1000),
                max_attempts: None,
                idempotency_key: None,
                result_timeout_secs: None,
            };
            app.commands
                .create_fleet_command(&mooring_server::access::Access::all(), to, c)
                .await
                .map(|v| (v.parent.id.clone(), v.parent.total))
                .map_err(|e| e.to_string())?
        }
        (None, None) => return Err("the server is down".to_owned()),
    };
    lock(&control.fleet_commands).push((i, id, total));
    Ok(total)
}

/// Records the wall time until every device command of fleet command `id` is final (polled
/// every simulated 100 ms while the server runs; gives up when the run ends).
async fn watch_fleet_command(control: Arc<Control>, id: String) {
    let started = std::time::Instant::now();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let Some(app) = control.app() else {
            continue;
        };
        if let Ok(Some(view)) = app
            .commands
            .fleet_command(&mooring_server::access::Access::all(), &id)
            .await
        {
            if view.done {
                let wall_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                lock(&control.fleet_done_wall_ms).insert(id, wall_ms);
                return;
            }
        }
    }
}

/// An event's target (a region, a selector, a device) and detail (a command's name, new tags).
fn describe(action: &Action) -> (String, String) {
    match action {
        Action::Command { to, name, .. } => (to.clone(), name.clone()),
        Action::CutLink { region, .. } if region.is_empty() => {
            ("all regions".into(), String::new())
        }
        Action::CutLink { region, .. } => (format!("region {region}"), String::new()),
        Action::DeleteDevice { device } => (device.clone(), String::new()),
        Action::ReportJob {
            to, since, until, ..
        } => (
            to.clone(),
            format!("points {}..{}", fmt_ms(since.0), fmt_ms(until.0)),
        ),
        Action::Retag { to, tags } | Action::TagJob { to, tags } => (
            to.clone(),
            tags.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        Action::RestartServer { downtime } => {
            (String::new(), format!("{} down", fmt_ms(downtime.0)))
        }
        Action::KillNode { node } | Action::RestartNode { node } => (node_id(*node), String::new()),
        Action::OtaDeploy { version, to, .. } => (to.clone(), version.clone()),
        Action::Rollout(r) => (r.to.clone(), r.version.clone()),
    }
}

/// Kills cluster node `node` (1-based) as `kill -9` would: off the network, every connection
/// to it dropped where it is, its tasks aborted (`RunningServer::kill`). Returns the devices
/// that were connected to it (whose reconnection the run then measures) and the virtual ms of
/// the kill; starts a watch of where its leases go (noted under the event's time `at_ms`).
async fn kill_node(
    control: &Arc<Control>,
    devices: &[Arc<DeviceState>],
    node: usize,
    at_ms: u64,
) -> Result<(Vec<usize>, u64), String> {
    let slot = node
        .checked_sub(1)
        .ok_or_else(|| format!("there is no node {node}"))?;
    let mut servers = control.servers.lock().await;
    let live = servers.iter().filter(|s| s.is_some()).count();
    let server = match servers.get_mut(slot) {
        None => return Err(format!("there is no node {node}")),
        Some(s) => s.take(),
    };
    let Some(server) = server else {
        return Err(format!("{} is not running", node_id(node)));
    };
    if live <= 1 {
        if let Some(s) = servers.get_mut(slot) {
            *s = Some(server);
        }
        return Err(format!(
            "{} is the last node running; a cluster needs one",
            node_id(node)
        ));
    }
    drop(servers);
    // From here to the kill nothing awaits: no other task runs in between.
    let since = control.net.clock.elapsed_ms();
    let hit: Vec<usize> = devices
        .iter()
        .filter(|d| d.link.connected_node() == Some(slot))
        .map(|d| {
            d.link.await_reconnect(since);
            d.index
        })
        .collect();
    // What the node was doing, read before it dies (measurement only: a real kill -9 leaves
    // nothing to read).
    let app = &server.server.app;
    let counters = cluster_counters(&parse_metrics(&mooring_server::render_metrics(app)));
    let leases: Vec<String> = app.cluster().map_or_else(Vec::new, |c| {
        c.held_leases().iter().map(|l| (*l).to_owned()).collect()
    });
    {
        let mut history = lock(&control.node_history);
        if let Some(h) = history.get_mut(slot) {
            h.kills += 1;
            for (k, v) in counters {
                *h.counters.entry(k).or_default() += v;
            }
        }
    }
    control.net.kill_node(slot);
    control.set_app(slot, None);
    server.kill();
    control.fault("node_kill", 1, 0);
    if !leases.is_empty() {
        let key = (at_ms, node_id(node));
        lock(&control.watchers).spawn(watch_leases(control.clone(), key, leases, since));
    }
    Ok((hit, since))
}

/// Starts killed cluster node `node` (1-based) again, same node id, on the shared store.
async fn restart_node(control: &Control, node: usize) -> Result<(), String> {
    let slot = node
        .checked_sub(1)
        .ok_or_else(|| format!("there is no node {node}"))?;
    match control.servers.lock().await.get(slot) {
        None => return Err(format!("there is no node {node}")),
        Some(Some(_)) => return Err(format!("{} is running", node_id(node))),
        Some(None) => {}
    }
    let server = control
        .start_server(slot)
        .await
        .map_err(|e| format!("{e:#}"))?;
    control.put_server(slot, &server);
    if let Some(s) = control.servers.lock().await.get_mut(slot) {
        *s = Some(server);
    }
    if let Some(h) = lock(&control.node_history).get_mut(slot) {
        h.starts += 1;
    }
    control.fault("node_restart", 1, 1);
    Ok(())
}

/// How often a killed node's leases are looked for on the other nodes (simulated time).
const LEASE_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Watches the live nodes until each of `leases` (held by the node killed at `since` ms) is
/// held by one of them, noting which and when (in `control.lease_moves` under `key`). A lease
/// is taken when a node next runs its work, so some move only when that work's period comes
/// round; the watch ends when every one moved or the run ends.
async fn watch_leases(control: Arc<Control>, key: (u64, String), leases: Vec<String>, since: u64) {
    let mut moves: Vec<LeaseMove> = leases
        .into_iter()
        .map(|lease| LeaseMove {
            lease,
            ..LeaseMove::default()
        })
        .collect();
    lock(&control.lease_moves).insert(key.clone(), moves.clone());
    while moves.iter().any(|m| m.to.is_none()) {
        tokio::time::sleep(LEASE_WATCH_INTERVAL).await;
        let now = control.net.clock.elapsed_ms();
        for (slot, app) in control.live_apps() {
            let Some(cluster) = app.cluster() else {
                continue;
            };
            let held = cluster.held_leases();
            for m in moves.iter_mut().filter(|m| m.to.is_none()) {
                if held.contains(&m.lease.as_str()) {
                    m.to = Some(node_id(slot + 1));
                    m.after_ms = Some(now.saturating_sub(since));
                }
            }
        }
        lock(&control.lease_moves).insert(key.clone(), moves.clone());
    }
}

pub(crate) fn fmt_ms(ms: u64) -> String {
    match ms {
        m if m % 3_600_000 == 0 && m > 0 => format!("{}h", m / 3_600_000),
        m if m % 60_000 == 0 && m > 0 => format!("{}m", m / 60_000),
        m if m % 1_000 == 0 => format!("{}s", m / 1_000),
        m => format!("{m}ms"),
    }
}

/// Replaces the tags of every device matching `selector`; returns how many were retagged.
pub(super) async fn retag(
    app: &App,
    selector: &str,
    tags: &BTreeMap<String, String>,
) -> Result<u64, String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let (page, next) = app
            .registry
            .list_selected_devices(
                &mooring_server::access::Access::all(),
                selector,
                Some(1000),
                cursor.as_deref(),
            )
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
            .set_tags(&mooring_server::access::Access::all(), id, tags.clone())
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(ids.len() as u64)
}

/// Creates a job as a real principal (an operator token), as the API would: the workers
/// re-check the creator before every turn. Its id.
async fn create_job(app: &App, selector: &str, action: JobAction) -> Result<String, String> {
    let (token, _secret) = app
        .tokens
        .create(mooring_server::auth::NewToken {
            name: "sim-jobs".to_owned(),
            role: mooring_store::Role::Operator,
            scope: None,
            expires_in_ms: None,
        })
        .await
        .map_err(|e| e.to_string())?;
    let job = app
        .jobs
        .create(
            &mooring_server::access::Access::all(),
            &mooring_server::jobs::Creator {
                name: token.id,
                role: mooring_store::Role::Operator,
            },
            selector,
            action,
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(job.id)
}
