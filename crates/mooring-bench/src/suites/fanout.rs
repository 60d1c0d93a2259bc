//! Suite 5: QoS 1 fan-out from publishers to one persistent backend subscriber, online and offline.

use super::publishers::{connect_publishers, publish_all, MESSAGES_PER_PUBLISHER_MAX};
use super::{fresh_start, medians, per_sec, row_from, IDLE_KEEPALIVE_SECS};
use crate::client::{self, Packet};
use crate::report::{Row, Table};
use crate::target::{self, Kind, Target};
use crate::Bench;
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The backend's subscription in the fan-out suite.
pub const FANOUT_FILTER: &str = "devices/+/telemetry";
/// Session-queue bytes the fan-out suite allows per message (topic + payload is about 70).
pub(super) const FANOUT_QUEUE_BYTES_PER_MESSAGE: usize = 256;
/// The servers' default session-queue bound, kept when a case needs less.
pub(super) const FANOUT_QUEUE_LEN_MIN: usize = 1_000;
pub(super) const FANOUT_QUEUE_BYTES_MIN: usize = 4 * 1024 * 1024;
/// Longest the subscriber waits for the next message once messages flow; a lost message ends
/// the wait after this instead of after `--timeout-secs`.
const FANOUT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the subscriber is connected while the publishers publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SubscriberMode {
    /// Connected: every message goes straight through.
    Online,
    /// Disconnected (its session kept): messages queue, then it connects and drains them.
    Offline,
}

/// One column of the fan-out table: a target, and for Mosquitto whether `persistence true`.
#[derive(Clone, Copy, Debug)]
struct FanoutColumn {
    target: usize,
    persistence: bool,
    label: &'static str,
}

/// What one fan-out run measured on one target.
#[derive(Debug)]
struct FanoutRun {
    /// Publisher PUBACKs ÷ time from the first PUBLISH to the last PUBACK.
    acked_rate: f64,
    /// Messages the subscriber got ÷ time from the first PUBLISH (online) or its CONNACK
    /// (offline) to the last message.
    delivered_rate: f64,
    acked: usize,
    delivered: usize,
    /// Ours: messages dropped for a full session queue during the run.
    queue_full: Option<f64>,
}

/// Suite 5: QoS 1 fan-out from 1 and 100 publishers to one backend subscriber that holds a
/// persistent session (clean session 0) on `devices/+/telemetry`, online and offline.
pub async fn fanout(b: &mut Bench) -> anyhow::Result<Table> {
    let mut table =
        Table::new("QoS 1 fan-out to a persistent subscriber (msg/s, higher is better)");
    let publishers_max = b.args.publishers.iter().copied().max().unwrap_or(1);
    let total_max = b.args.messages.max(publishers_max);
    // Room for every message of a case in the one session, on both servers.
    let bounds = target::QueueBounds {
        len_max: total_max.max(FANOUT_QUEUE_LEN_MIN),
        bytes_max: (total_max * FANOUT_QUEUE_BYTES_PER_MESSAGE).max(FANOUT_QUEUE_BYTES_MIN),
    };
    let mut columns = Vec::new();
    for (i, t) in b.targets.iter_mut().enumerate() {
        t.set_queue_bounds(Some(bounds));
        t.set_persistence(false)?;
        fresh_start(t, publishers_max).await?;
        columns.push(FanoutColumn {
            target: i,
            persistence: false,
            label: t.name(),
        });
        if t.kind == Kind::Mosquitto && b.args.mosquitto_persistence {
            columns.push(FanoutColumn {
                target: i,
                persistence: true,
                label: "mosquitto-persistence",
            });
        }
    }
    let (args, sources) = (b.args.clone(), b.sources.clone());
    for &p in &args.publishers {
        anyhow::ensure!(p >= 1, "--publishers must be at least 1");
        let total = args.messages.max(p);
        let pp = format!("{p} publisher{}", if p == 1 { "" } else { "s" });
        for mode in [SubscriberMode::Online, SubscriberMode::Offline] {
            let mut acked: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
            let mut delivered: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
            let mut notes = Vec::new();
            // Targets alternate within each repetition, so slow phases of a shared machine hit both.
            for rep in 0..args.repeat.max(1) {
                let case = b.next_case();
                let seq_base = b.seq_base + case * MESSAGES_PER_PUBLISHER_MAX as u64;
                for col in &columns {
                    let t = &mut b.targets[col.target];
                    if t.persistence() != col.persistence {
                        t.kill().await;
                        t.set_persistence(col.persistence)?;
                    }
                    if !t.is_running() {
                        t.start().await?;
                    }
                    eprintln!(
                        "fanout: {} subscriber {mode:?}, {pp}, {total} messages (run {})",
                        col.label,
                        rep + 1
                    );
                    match fanout_run(t, &args, &sources, p, total, mode, seq_base).await {
                        Ok(r) => {
                            eprintln!(
                                "  {}: PUBACKs {:.0} msg/s, delivered {:.0} msg/s ({} of {} acked){}",
                                col.label,
                                r.acked_rate,
                                r.delivered_rate,
                                r.delivered,
                                r.acked,
                                r.queue_full
                                    .map_or(String::new(), |q| format!(", queue_full {q}"))
                            );
                            acked.entry(col.label).or_default().push(r.acked_rate);
                            delivered
                                .entry(col.label)
                                .or_default()
                                .push(r.delivered_rate);
                            if r.delivered != r.acked || r.queue_full.is_some_and(|q| q > 0.0) {
                                notes.push(format!(
                                    "{} (run {}): only {} of {} acked delivered{}",
                                    col.label,
                                    rep + 1,
                                    r.delivered,
                                    r.acked,
                                    r.queue_full.map_or(String::new(), |q| format!(
                                        ", {q} dropped for a full queue"
                                    ))
                                ));
                            }
                        }
                        Err(e) => {
                            eprintln!("  {}: failed: {e:#}", col.label);
                            notes.push(format!("{} (run {}): failed: {e}", col.label, rep + 1));
                            // Whatever state it is in, the next run starts it afresh.
                            t.kill().await;
                        }
                    }
                }
            }
            let (acked_metric, delivered_metric) = match mode {
                SubscriberMode::Online => (
                    format!("online subscriber, {pp}: publisher PUBACKs/s"),
                    format!("online subscriber, {pp}: delivered msg/s (end to end)"),
                ),
                SubscriberMode::Offline => (
                    format!("offline subscriber, {pp}: queued msg/s (publisher PUBACKs)"),
                    format!("offline subscriber, {pp}: drained msg/s after reconnect"),
                ),
            };
            let (acked_m, acked_note) = medians(&acked);
            let (delivered_m, delivered_note) = medians(&delivered);
            notes.insert(0, delivered_note);
            table.push(
                fanout_row(delivered_metric.clone(), &delivered_m, None).note(notes.join("; ")),
            );
            table.push(fanout_row(acked_metric.clone(), &acked_m, None).note(acked_note));
            if columns.iter().any(|c| c.persistence) {
                let persist = Some("mosquitto-persistence");
                table.push(
                    fanout_row(
                        format!("{delivered_metric}, mosquitto persistence true"),
                        &delivered_m,
                        persist,
                    )
                    .note("mooring column: —, see the row above"),
                );
                table.push(fanout_row(
                    format!("{acked_metric}, mosquitto persistence true"),
                    &acked_m,
                    persist,
                ));
            }
        }
    }
    for t in b.targets.iter_mut() {
        t.kill().await;
        t.set_queue_bounds(None);
        t.set_persistence(false)?;
    }
    table.push(Row::new("setup", None, None).note(format!(
        "subscriber: clean session 0, SUBSCRIBE {FANOUT_FILTER} QoS 1, PUBACKs every message \
         (mooring: service token as password over TLS without a client certificate; mosquitto: \
         client certificate); publishers QoS 1, ≤{} in flight each; session queue bound {} \
         messages / {} bytes on both, so nothing is dropped (defaults: 1,000 / 4 MiB on \
         mooring, 1,000 / none on mosquitto); in flight to the subscriber: mooring 32, mosquitto 20 (defaults); mooring \
         stores every telemetry point, and every message queued for the persistent \
         subscriber, before the publisher's PUBACK (two group commits); \
         mosquitto persistence {}",
        args.window,
        crate::report::fmt_value(Some(bounds.len_max as f64)),
        crate::report::fmt_value(Some(bounds.bytes_max as f64)),
        if args.mosquitto_persistence {
            "off, and on in the rows so marked (saved only every autosave_interval, 1800 s, and at \
             a clean shutdown: never during a run)"
        } else {
            "off"
        }
    )));
    Ok(table)
}

/// A row with ours and Mosquitto's medians, or (with `mosquitto_label`) Mosquitto's variant only.
fn fanout_row(
    metric: String,
    m: &BTreeMap<&'static str, f64>,
    mosquitto_label: Option<&str>,
) -> Row {
    match mosquitto_label {
        None => row_from(metric, m),
        Some(label) => Row::new(metric, None, m.get(label).copied()),
    }
}

/// One fan-out run: a fresh persistent session subscribed to [`FANOUT_FILTER`], `publishers`
/// devices publish `total` QoS 1 messages; online, the subscriber receives them meanwhile;
/// offline, it is disconnected until the last PUBACK and then drains its queue. The session
/// is discarded at the end.
async fn fanout_run(
    t: &mut Target,
    args: &crate::BenchArgs,
    sources: &std::sync::Arc<client::SourceAddrs>,
    publishers: usize,
    total: usize,
    mode: SubscriberMode,
    seq_base: u64,
) -> anyhow::Result<FanoutRun> {
    let ep = t.endpoint()?.clone();
    let backend = t.backend_login().await?;
    let persistent = client::ConnectOpts {
        keepalive_secs: IDLE_KEEPALIVE_SECS,
        clean_session: false,
        login: backend.login.clone(),
    };
    let connect = |clean: bool| {
        let opts = client::ConnectOpts {
            clean_session: clean,
            ..persistent.clone()
        };
        let (ep, tls, src) = (ep.clone(), backend.tls.clone(), sources.next());
        async move { client::connect_with(&ep, tls, target::BACKEND_CLIENT_ID, src, &opts).await }
    };
    // No session left by an earlier run: a clean-session CONNECT discards it.
    connect(true).await?.0.close().await;
    let (mut sub, _) = connect(false).await?;
    sub.subscribe(FANOUT_FILTER, 1).await?;
    let queue_full_before = t.metric(QUEUE_FULL_METRIC).await?;
    let deadline = tokio::time::Instant::now() + args.timeout();
    let mut receiver = match mode {
        SubscriberMode::Online => Some(tokio::spawn(receive_all(sub, total, deadline))),
        SubscriberMode::Offline => {
            sub.close().await;
            None
        }
    };
    let conns = match connect_publishers(t, sources, publishers).await {
        Ok(c) => c,
        Err(e) => {
            if let Some(r) = receiver.take() {
                r.abort();
            }
            return Err(e);
        }
    };
    let started = Instant::now();
    let published = publish_all(conns, total, 1, args, seq_base).await;
    let acked_elapsed = started.elapsed();
    let (_, acked) = match published {
        Ok(r) => r,
        Err(e) => {
            if let Some(r) = receiver.take() {
                r.abort();
            }
            return Err(e);
        }
    };
    let (delivered, delivered_elapsed) = match receiver {
        Some(r) => {
            let (got, last) = r.await.context("subscriber task")??;
            (got, last.map_or(Duration::ZERO, |l| l - started))
        }
        None => {
            let (sub, present) = connect(false).await?;
            anyhow::ensure!(
                present,
                "the subscriber's session was not kept while it was offline"
            );
            let connacked = Instant::now();
            let (got, last) = receive_all(sub, acked, deadline).await?;
            (got, last.map_or(Duration::ZERO, |l| l - connacked))
        }
    };
    let queue_full = match (queue_full_before, t.metric(QUEUE_FULL_METRIC).await?) {
        (Some(a), Some(b)) => Some(b - a),
        (None, Some(b)) => Some(b),
        _ => None,
    };
    connect(true).await?.0.close().await;
    Ok(FanoutRun {
        acked_rate: per_sec(acked, acked_elapsed),
        delivered_rate: per_sec(delivered, delivered_elapsed),
        acked,
        delivered,
        queue_full,
    })
}

/// Ours: messages dropped because a session queue was full.
const QUEUE_FULL_METRIC: &str = "mooring_mqtt_refusals_total{reason=\"queue_full\"}";

/// Reads QoS 1 messages and PUBACKs each (acks flushed whenever no further packet is already
/// buffered) until `expect` arrived, nothing came for [`FANOUT_IDLE_TIMEOUT`] after the first,
/// or `deadline`; then disconnects. Returns the count and when the last one arrived.
pub(super) async fn receive_all(
    mut conn: client::Conn,
    expect: usize,
    deadline: tokio::time::Instant,
) -> anyhow::Result<(usize, Option<Instant>)> {
    let (mut got, mut last) = (0usize, None);
    while got < expect {
        let until = match last {
            Some(l) => deadline.min(tokio::time::Instant::from_std(l + FANOUT_IDLE_TIMEOUT)),
            None => deadline,
        };
        let packet = match tokio::time::timeout_at(until, conn.read_packet()).await {
            Ok(p) => p?,
            Err(_) => break,
        };
        match packet {
            Some(Packet::Publish { qos, packet_id, .. }) => {
                if qos > 0 {
                    conn.queue_puback(packet_id);
                }
                got += 1;
                last = Some(Instant::now());
            }
            Some(_) => {}
            None => bail!("subscriber connection closed after {got} messages"),
        }
        if !conn.has_buffered_packet() {
            tokio::time::timeout_at(deadline, conn.flush())
                .await
                .context("subscriber could not send its PUBACKs before the deadline")??;
        }
    }
    conn.close().await;
    Ok((got, last))
}
