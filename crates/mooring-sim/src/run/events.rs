//! The scenario's events played at their times, through the server's own services (or the
//! remote server's API): fleet commands, link cuts, device deletion, retagging, restarts.

use super::Control;
use crate::device::{DeviceState, SIM_CMD_KEY};
use crate::harness::InProcessServer;
use crate::scenario::{Action, Scenario};
use mooring_proto::sync::lock;
use mooring_server::app::App;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::time::Instant;

/// Plays the scenario's events at their times.
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

pub(super) fn fmt_ms(ms: u64) -> String {
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
