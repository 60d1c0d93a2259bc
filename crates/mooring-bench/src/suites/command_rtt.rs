//! Suite 4: command round trip, through our HTTP API or over plain MQTT for Mosquitto.

use super::{
    fresh_start, over_fd_limit, percentile, row_from, spawn_connected, IDLE_KEEPALIVE_SECS,
};
use crate::client::{self, Packet};
use crate::fleet::FleetOpts;
use crate::report::{Row, Table};
use crate::target::{Kind, Target};
use crate::Bench;
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::time::Instant;

/// Suite 4: command round trip with N devices online, each answering every command at once.
///
/// Ours: `POST /api/v1/devices/<id>/commands?wait_ms=…` → stored, delivered (QoS 1) → the device
/// publishes `…/result` → stored → the API answers `succeeded`. Mosquitto has no commands: the same
/// exchange over plain MQTT (a backend publishes to `devices/<id>/commands/<cmd>` and waits for
/// `…/result` on its subscription), with nothing stored.
pub async fn command_rtt(b: &mut Bench) -> anyhow::Result<Table> {
    let mut table = Table::new("command round trip (lower is better)");
    let n = b.args.command_devices.max(1);
    let nn = crate::report::fmt_value(Some(n as f64));
    if let Some(note) = over_fd_limit(b, n + 1) {
        table.push(Row::new(format!("command RTT p50, ms ({nn} online)"), None, None).note(note));
        return Ok(table);
    }
    let (k, in_flight) = (b.args.commands.max(1), b.args.command_concurrency.max(1));
    let (mut p50, mut p99, mut rate) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let mut notes = Vec::new();
    for t in b.targets.iter_mut() {
        eprintln!(
            "command-rtt: {} with {n} devices online, {k} commands",
            t.name()
        );
        fresh_start(t, n).await?;
        if t.kind == Kind::Mooring && !t.has_commands_api().await? {
            notes.push(
                "mooring: not yet available: the server has no commands API \
                 (/api/v1/devices/{id}/commands absent from its OpenAPI document)"
                    .to_owned(),
            );
            t.kill().await;
            continue;
        }
        let opts = FleetOpts {
            keepalive_secs: IDLE_KEEPALIVE_SECS,
            reconnect: false,
            attempts_max: 5,
            concurrency: b.args.connect_concurrency,
            respond_to_commands: true,
        };
        let Some(fleet) = spawn_connected(
            t,
            n,
            b.sources.clone(),
            opts,
            b.args.timeout(),
            "devices subscribed",
            &mut notes,
        )
        .await?
        else {
            continue;
        };
        let started = Instant::now();
        let result = match t.kind {
            Kind::Mooring => {
                tokio::time::timeout(b.args.timeout(), api_commands(t, n, k, in_flight)).await
            }
            Kind::Mosquitto => {
                tokio::time::timeout(
                    b.args.timeout(),
                    mqtt_commands(t, n, k, in_flight, &b.sources),
                )
                .await
            }
        };
        let elapsed = started.elapsed();
        fleet.shutdown().await;
        t.kill().await;
        let mut rtts = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                notes.push(format!("{}: failed: {e:#}", t.name()));
                continue;
            }
            Err(_) => {
                notes.push(format!("{}: timed out", t.name()));
                continue;
            }
        };
        rtts.sort_by(f64::total_cmp);
        let (a, z) = (percentile(&rtts, 0.50), percentile(&rtts, 0.99));
        eprintln!("  {}: p50 {a:.2} ms, p99 {z:.2} ms", t.name());
        p50.insert(t.name(), a);
        p99.insert(t.name(), z);
        rate.insert(t.name(), rtts.len() as f64 / elapsed.as_secs_f64());
    }
    table.push(
        row_from(format!("command RTT p50, ms ({nn} online)"), &p50).note(
            "mooring: POST …/commands?wait_ms → stored → delivered QoS 1 → device result → stored → 200 succeeded",
        ),
    );
    table.push(row_from(format!("command RTT p99, ms ({nn} online)"), &p99).note(
        "mosquitto: backend publishes QoS 1 to devices/<id>/commands/<cmd>, device answers on …/result; nothing stored",
    ));
    table.push(
        row_from(
            format!("commands/s, {in_flight} in flight (higher is better)"),
            &rate,
        )
        .note(
            std::iter::once(format!("{k} commands spread over the devices"))
                .chain(notes)
                .collect::<Vec<_>>()
                .join("; "),
        ),
    );
    Ok(table)
}

/// Which device the `i`-th command goes to (spread over the fleet).
fn command_device(i: usize, n: usize) -> usize {
    (i * 7_919) % n
}

/// Ours: `k` commands through the HTTP API, `in_flight` at once; RTTs in ms.
async fn api_commands(
    t: &Target,
    n: usize,
    k: usize,
    in_flight: usize,
) -> anyhow::Result<Vec<f64>> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ids: Vec<String> = t.creds(n)?.iter().map(|c| c.id.clone()).collect();
    let ids = std::sync::Arc::new(ids);
    let api = t.api_client()?;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (next, ids, api) = (next.clone(), ids.clone(), api.clone());
        set.spawn(async move {
            let mut rtts = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= k {
                    return anyhow::Ok(rtts);
                }
                let id = &ids[command_device(i, ids.len())];
                let sent = Instant::now();
                let ping = mooring_api::CreateCommand {
                    name: "ping".to_owned(),
                    ..Default::default()
                };
                let (_, c) = api.create_command(id, &ping, Some(10_000)).await?;
                let rtt = sent.elapsed().as_secs_f64() * 1000.0;
                anyhow::ensure!(
                    c.state == "succeeded",
                    "command to {id} not succeeded after {rtt:.0} ms: {c:?}"
                );
                rtts.push(rtt);
            }
        });
    }
    let mut all = Vec::with_capacity(k);
    while let Some(r) = set.join_next().await {
        all.extend(r.context("command task")??);
    }
    Ok(all)
}

/// Mosquitto: the same exchange over MQTT from a backend client; RTTs in ms.
async fn mqtt_commands(
    t: &Target,
    n: usize,
    k: usize,
    in_flight: usize,
    sources: &client::SourceAddrs,
) -> anyhow::Result<Vec<f64>> {
    let ep = t.endpoint()?;
    let backend = t.backend_cred()?;
    let mut conn = client::connect(
        ep,
        ep.tls_config(&backend)?,
        &backend.id,
        sources.next(),
        60,
    )
    .await?;
    conn.subscribe("devices/+/commands/+/result", 1).await?;
    let ids: Vec<&str> = t.creds(n)?.iter().map(|c| c.id.as_str()).collect();
    let mut pending: BTreeMap<String, Instant> = BTreeMap::new();
    let (mut sent, mut rtts) = (0usize, Vec::with_capacity(k));
    let mut packet_id: u16 = 1;
    while rtts.len() < k {
        while pending.len() < in_flight && sent < k {
            let cmd = format!("c{sent}");
            let id = ids[command_device(sent, n)];
            let payload = format!("{{\"id\":\"{cmd}\",\"name\":\"ping\"}}");
            conn.queue_publish(
                &format!("devices/{id}/commands/{cmd}"),
                payload.as_bytes(),
                1,
                packet_id,
            );
            packet_id = packet_id.checked_add(1).unwrap_or(1);
            pending.insert(cmd, Instant::now());
            sent += 1;
        }
        conn.flush().await?;
        match conn.read_packet().await? {
            Some(Packet::Publish {
                topic,
                qos,
                packet_id: id,
            }) => {
                if qos > 0 {
                    conn.queue_puback(id);
                }
                let cmd = topic
                    .strip_suffix("/result")
                    .and_then(|t| t.rsplit('/').next())
                    .unwrap_or_default();
                if let Some(at) = pending.remove(cmd) {
                    rtts.push(at.elapsed().as_secs_f64() * 1000.0);
                }
            }
            Some(_) => {}
            None => bail!("backend connection closed after {} results", rtts.len()),
        }
    }
    conn.close().await;
    Ok(rtts)
}
