//! Suite 7: retention of a day of a large fleet's telemetry while devices keep publishing: PUBACK
//! latency during the pass and after it, and how fast the pass deletes.
//!
//! Ours only: Mosquitto stores no telemetry, so it has nothing to expire. The server is stopped,
//! a day of telemetry of `--retention-devices` devices (one metric every 5 minutes, one `seq` per
//! record, as the simulator's fleets send) is written straight into its store 40 days in the past
//! and compacted as the running server would have done long before (one chunk per series and
//! hour: points and dedupe keys), and the server is started with `retention_days = 30`. Its retention task runs at once. Meanwhile `--publishers` devices
//! publish QoS 1 at a steady rate, one message in flight each, and every PUBACK's latency is
//! recorded with the time it arrived; the pass's end is read from `/metrics`
//! (`mooring_telemetry_retention_passes_total`).

use super::fresh_start;
use super::percentile;
use super::publishers::connect_publishers;
use crate::client::{self, Packet};
use crate::report::{Row, Table};
use crate::target::Kind;
use crate::Bench;
use anyhow::{bail, Context};
use mooring_store::{
    run_compaction_pass, DeviceId, MetricValue, SqliteStore, TelemetryRecord, TelemetryStore,
};
use std::time::{Duration, Instant};

/// A record every 5 minutes: 288 per device-day.
const INTERVAL_MS: u64 = 5 * 60_000;
const RECORDS_PER_DEVICE: u64 = 86_400_000 / INTERVAL_MS;
/// Records per prefill `append_batch` (the writer's default batch).
const PREFILL_BATCH_LEN: usize = 1024;
/// The day written is this far in the past; the server keeps 30 days.
const AGE_DAYS: u64 = 40;
/// Each publisher sends one message per this interval (one in flight).
const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);
/// How long publishing goes on after the pass ended, for the "after" figures.
const AFTER: Duration = Duration::from_secs(10);
/// How often `/metrics` is read for the pass's progress.
const POLL: Duration = Duration::from_millis(100);

/// Suite 7: see the module docs.
pub async fn retention(b: &mut Bench) -> anyhow::Result<Table> {
    let devices = b.args.retention_devices.max(1);
    let publishers = b
        .args
        .publishers
        .iter()
        .copied()
        .max()
        .unwrap_or(100)
        .max(1);
    let points = devices as u64 * RECORDS_PER_DEVICE;
    let mut table = Table::new(format!(
        "retention of a day of {} devices' telemetry during ingest (ours only)",
        crate::report::fmt_value(Some(devices as f64))
    ));
    let Some(t) = b.targets.iter_mut().find(|t| t.kind == Kind::Mooring) else {
        table.push(
            Row::new("retention pass, s", None, None)
                .note("needs --targets mooring (Mosquitto stores no telemetry to expire)"),
        );
        return Ok(table);
    };
    fresh_start(t, publishers).await?;
    t.kill().await;
    let data_dir = t.data_dir().context("mooring data dir")?.to_owned();
    eprintln!("retention: writing {points} old points of {devices} devices into the store");
    let started = Instant::now();
    prefill(&data_dir, devices).await?;
    eprintln!("  prefilled in {:.0} s", started.elapsed().as_secs_f64());
    t.set_extra_config(Some(
        "[telemetry]\nretention_days = 30\nretention_interval_secs = 86400\n".to_owned(),
    ))?;
    let start_result = t.start().await;
    t.set_extra_config(None)?;
    start_result?;
    let pass_started = Instant::now();
    let conns = connect_publishers(t, &b.sources, publishers).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut set = tokio::task::JoinSet::new();
    for (id, conn) in conns {
        set.spawn(paced(conn, id, b.seq_base, pass_started, stopped.clone()));
    }
    // The pass ends when the passes counter moves; then publishing goes on for AFTER.
    let deadline = pass_started + b.args.timeout();
    let pass_secs = loop {
        if t.metric("mooring_telemetry_retention_passes_total")
            .await?
            .unwrap_or(0.0)
            >= 1.0
        {
            break pass_started.elapsed().as_secs_f64();
        }
        if Instant::now() > deadline {
            let _ = stop.send(true);
            bail!("the retention pass did not end within --timeout-secs");
        }
        tokio::time::sleep(POLL).await;
    };
    let rows = t
        .metric("mooring_telemetry_retention_rows_total")
        .await?
        .unwrap_or(0.0);
    tokio::time::sleep(AFTER).await;
    let _ = stop.send(true);
    let (mut during, mut after) = (Vec::new(), Vec::new());
    let mut failures = 0usize;
    while let Some(joined) = set.join_next().await {
        match joined.context("publisher task")? {
            Ok(acks) => {
                for (at_s, ms) in acks {
                    if at_s <= pass_secs {
                        during.push(ms);
                    } else {
                        after.push(ms);
                    }
                }
            }
            Err(e) => {
                failures += 1;
                eprintln!("  publisher failed: {e:#}");
            }
        }
    }
    t.kill().await;
    during.sort_by(f64::total_cmp);
    after.sort_by(f64::total_cmp);
    let rate = publishers as f64 / PUBLISH_INTERVAL.as_secs_f64();
    let load = format!(
        "{publishers} publishers × {:.0} msg/s QoS 1, one in flight each ({rate:.0} msg/s); {failures} publishers failed",
        1.0 / PUBLISH_INTERVAL.as_secs_f64()
    );
    table.push(
        Row::new("retention pass, s (lower is better)", Some(pass_secs), None).note(format!(
            "{points} points + {points} dedupe keys of {devices} devices (1 metric every 5 min, one day, {AGE_DAYS} days old, compacted: 2 chunks per device-hour); {rows:.0} rows deleted"
        )),
    );
    table.push(
        Row::new(
            "rows deleted per second (higher is better)",
            Some(rows / pass_secs.max(f64::MIN_POSITIVE)),
            None,
        )
        .note(
            "1,000 rows per transaction, each committed alone and only when no other write waits",
        ),
    );
    for (name, v) in [("during the pass", &during), ("after it", &after)] {
        table.push(
            Row::new(
                format!("PUBACK p50 / p99, ms, {name} (lower is better)"),
                Some(percentile(v, 0.99)),
                None,
            )
            .note(format!(
                "p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms over {} acks; {load}",
                percentile(v, 0.5),
                percentile(v, 0.99),
                v.last().copied().unwrap_or(0.0),
                v.len()
            )),
        );
    }
    Ok(table)
}

/// Writes a day of telemetry of `devices` devices, [`AGE_DAYS`] old, into the store in `data_dir`.
async fn prefill(data_dir: &std::path::Path, devices: usize) -> anyhow::Result<()> {
    let dir = data_dir.to_owned();
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
        .await
        .context("open task")??;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let day_start = (now_ms - AGE_DAYS * 86_400_000) / 86_400_000 * 86_400_000;
    let mut batch = Vec::with_capacity(PREFILL_BATCH_LEN);
    for d in 0..devices {
        let id = DeviceId::parse(&format!("old-{d}")).context("device id")?;
        for k in 0..RECORDS_PER_DEVICE {
            batch.push(TelemetryRecord {
                device_id: id.clone(),
                seq: Some(k),
                ts_ms: day_start + k * INTERVAL_MS + (d as u64 % INTERVAL_MS),
                points: vec![("v".to_owned(), MetricValue::Number((k % 100) as f64 / 10.0))],
            });
            if batch.len() == PREFILL_BATCH_LEN {
                store.append_batch(std::mem::take(&mut batch)).await?;
            }
        }
        if d % 10_000 == 9_999 {
            eprintln!("  {} devices written", d + 1);
        }
    }
    if !batch.is_empty() {
        store.append_batch(batch).await?;
    }
    eprintln!("  compacting");
    while run_compaction_pass(&store, now_ms, 5000, 1000).await? > 0 {}
    Ok(())
}

/// Publishes one QoS 1 message per [`PUBLISH_INTERVAL`] until `stop`; returns (seconds since
/// `t0` when the PUBACK came, latency in ms) per message.
async fn paced(
    mut conn: client::Conn,
    id: String,
    seq_base: u64,
    t0: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let topic = format!("devices/{id}/telemetry");
    let mut acks = Vec::new();
    let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for k in 0u64.. {
        tick.tick().await;
        if *stop.borrow() {
            break;
        }
        let packet_id = u16::try_from(k % 65_535 + 1).unwrap_or(1);
        let payload = format!("{{\"seq\":{},\"v\":1.0}}", seq_base + k);
        let sent = Instant::now();
        conn.queue_publish(&topic, payload.as_bytes(), 1, packet_id);
        conn.flush().await?;
        loop {
            match conn.read_packet().await? {
                Some(Packet::PubAck { .. }) => break,
                Some(_) => {}
                None => bail!("{id}: closed after {} PUBACKs", acks.len()),
            }
        }
        acks.push((
            t0.elapsed().as_secs_f64(),
            sent.elapsed().as_secs_f64() * 1000.0,
        ));
    }
    conn.close().await;
    Ok(acks)
}
