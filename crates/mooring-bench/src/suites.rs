//! The benchmark suites (idle memory, ingest, connect storm, command RTT, fan-out): each drives every target with the same load and returns one table.

use crate::client::{self, Packet};
use crate::fleet::{Fleet, FleetOpts};
use crate::report::{Row, Table};
use crate::target::{self, Kind, Target};
use crate::Bench;
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Keep-alive of idle devices (they ping at ¾ of it, so never during a default-sized run).
pub const IDLE_KEEPALIVE_SECS: u16 = 300;
/// Wait after the last CONNACK (or a start) before sampling RSS, so buffers settle.
pub const RSS_SETTLE: Duration = Duration::from_secs(2);
/// Bytes queued by a QoS 0 publisher before it writes them out.
const QOS0_WRITE_CHUNK_BYTES: usize = 16 * 1024;
/// Publishers connecting at once before an ingest case.
const PUBLISHER_CONNECT_CONCURRENCY: usize = 32;
/// Longest the store may lag behind what a publisher sent or had acknowledged.
const STORE_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest message count one publisher sends in one case (keeps `seq` values unique per case).
pub const MESSAGES_PER_PUBLISHER_MAX: usize = 10_000_000;

fn per_kind<T: Copy>(m: &BTreeMap<&'static str, T>, kind: Kind) -> Option<T> {
    m.get(kind.name()).copied()
}

fn row_from(metric: String, m: &BTreeMap<&'static str, f64>) -> Row {
    Row::new(
        metric,
        per_kind(m, Kind::Mooring),
        per_kind(m, Kind::Mosquitto),
    )
}

/// `Some(note)` when `n` connections cannot fit under the open-file limit of a server process.
fn over_fd_limit(b: &Bench, n: usize) -> Option<String> {
    let usable = b.fd_limit.saturating_sub(target::FD_RESERVE);
    (n as u64 > usable).then(|| {
        format!(
            "not measured: {n} connections need more than the open-file limit of {} per process \
             (a hard limit here; raising it needs CAP_SYS_RESOURCE)",
            b.fd_limit
        )
    })
}

/// Kill, start fresh, provision `n` devices and, if that took work, restart so the server starts
/// from a clean heap (the HTTP provisioning traffic is not part of what we measure).
/// Spawns a fleet of `n` devices against `t` and waits until all are connected. If they are
/// not by `timeout`, records a note (`"<target>: only X of n <what>"`), tears the fleet and the
/// target down and returns `None`.
async fn spawn_connected(
    t: &mut Target,
    n: usize,
    sources: std::sync::Arc<crate::client::SourceAddrs>,
    opts: FleetOpts,
    timeout: Duration,
    what: &str,
    notes: &mut Vec<String>,
) -> anyhow::Result<Option<Fleet>> {
    let fleet = Fleet::spawn(t.endpoint()?.clone(), t.creds(n)?, sources, opts);
    if fleet.wait_until(timeout, |s| s.connacked(0) >= n).await {
        return Ok(Some(fleet));
    }
    notes.push(format!(
        "{}: only {} of {n} {what}",
        t.name(),
        fleet.stats.connacked(0)
    ));
    fleet.shutdown().await;
    t.kill().await;
    Ok(None)
}

async fn fresh_start(t: &mut Target, n: usize) -> anyhow::Result<()> {
    t.kill().await;
    t.start().await?;
    let took = t.ensure_devices(n).await?;
    if took > Duration::ZERO {
        eprintln!(
            "  {}: provisioned devices up to {n} in {:.1} s",
            t.name(),
            took.as_secs_f64()
        );
        t.kill().await;
        t.start().await?;
    }
    Ok(())
}

/// Suite 1: RSS growth per idle mTLS connection.
pub async fn idle_memory(b: &mut Bench) -> anyhow::Result<Table> {
    let mut table = Table::new("idle memory per connected mTLS device");
    let sizes = b.args.idle_connections();
    for n in sizes {
        if let Some(note) = over_fd_limit(b, n) {
            let nn = crate::report::fmt_value(Some(n as f64));
            table.push(
                Row::new(
                    format!("KiB per idle connection, {nn} conns (lower is better)"),
                    None,
                    None,
                )
                .note(note),
            );
            continue;
        }
        let mut per_conn = BTreeMap::new();
        let mut before = BTreeMap::new();
        let mut after = BTreeMap::new();
        let mut connect_secs = BTreeMap::new();
        let mut notes = Vec::new();
        for t in b.targets.iter_mut() {
            eprintln!("idle-memory: {} with {n} connections", t.name());
            fresh_start(t, n).await?;
            tokio::time::sleep(RSS_SETTLE).await;
            let rss0 = t.rss_kib()?;
            let self0 = target::rss_kib(std::process::id())?;
            let fleet = Fleet::spawn(
                t.endpoint()?.clone(),
                t.creds(n)?,
                b.sources.clone(),
                FleetOpts {
                    keepalive_secs: IDLE_KEEPALIVE_SECS,
                    reconnect: false,
                    attempts_max: 5,
                    concurrency: b.args.connect_concurrency,
                    respond_to_commands: false,
                },
            );
            let all = fleet
                .wait_until(b.args.timeout(), |s| s.connected_now() + s.failed() >= n)
                .await;
            let took = fleet.started.elapsed();
            let up = fleet.stats.connected_now();
            let errors = fleet.stats.connect_errors();
            tokio::time::sleep(RSS_SETTLE).await;
            let rss1 = t.rss_kib()?;
            let self1 = target::rss_kib(std::process::id())?;
            let still_up = fleet.stats.connected_now();
            fleet.shutdown().await;
            t.kill().await;
            if !all || up < n || still_up < up {
                notes.push(format!(
                    "{}: {up} of {n} connected{}, {still_up} still up at the RSS sample",
                    t.name(),
                    if all { "" } else { " before the timeout" }
                ));
            }
            if errors > 0 {
                notes.push(format!("{}: {errors} connect attempts retried", t.name()));
            }
            if up == 0 {
                continue;
            }
            per_conn.insert(t.name(), (rss1 as f64 - rss0 as f64) / up as f64);
            before.insert(t.name(), rss0 as f64 / 1024.0);
            after.insert(t.name(), rss1 as f64 / 1024.0);
            connect_secs.insert(t.name(), took.as_secs_f64());
            eprintln!(
                "  {}: {up}/{n} up in {:.1} s; server RSS {rss0} → {rss1} KiB; load generator RSS {self0} → {self1} KiB",
                t.name(),
                took.as_secs_f64(),
            );
        }
        let nn = crate::report::fmt_value(Some(n as f64));
        table.push(
            row_from(
                format!("KiB per idle connection, {nn} conns (lower is better)"),
                &per_conn,
            )
            .note(if notes.is_empty() {
                "server RSS delta ÷ connections; TLS 1.3, ECDSA P-256 client certs".to_owned()
            } else {
                notes.join("; ")
            }),
        );
        table.push(row_from(format!("server RSS before, MiB ({nn})"), &before));
        table.push(row_from(
            format!("server RSS with all connected, MiB ({nn})"),
            &after,
        ));
        table.push(
            row_from(format!("time to connect all {nn}, s"), &connect_secs).note(format!(
                "{} handshakes in flight from the load generator",
                b.args.connect_concurrency
            )),
        );
    }
    Ok(table)
}

/// What one ingest case measured on one target.
struct IngestResult {
    rate: f64,
    note: String,
}

/// Suite 2: QoS 0 / QoS 1 ingest from 1 and 100 publishers.
pub async fn ingest(b: &mut Bench) -> anyhow::Result<Table> {
    let mut table = Table::new("telemetry ingest (msg/s, higher is better)");
    let publishers_max = b.args.publishers.iter().copied().max().unwrap_or(1);
    for t in b.targets.iter_mut() {
        fresh_start(t, publishers_max).await?;
    }
    let (qos_list, publisher_counts) = (b.args.qos.clone(), b.args.publishers.clone());
    for qos in qos_list {
        anyhow::ensure!(qos <= 1, "--qos takes 0 and/or 1");
        for &p in &publisher_counts {
            anyhow::ensure!(p >= 1, "--publishers must be at least 1");
            let mut samples: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
            let mut notes = Vec::new();
            let (args, sources) = (b.args.clone(), b.sources.clone());
            // Targets alternate within each repetition, so slow phases of a shared machine hit both.
            for rep in 0..args.repeat.max(1) {
                let case = b.next_case();
                for t in b.targets.iter_mut() {
                    eprintln!(
                        "ingest: {} QoS{qos} {p} publishers, {} messages (run {})",
                        t.name(),
                        args.messages,
                        rep + 1
                    );
                    let seq_base = b.seq_base + case * MESSAGES_PER_PUBLISHER_MAX as u64;
                    match ingest_case(t, &args, &sources, p, qos, seq_base).await {
                        Ok(r) => {
                            eprintln!("  {}: {:.0} msg/s {}", t.name(), r.rate, r.note);
                            samples.entry(t.name()).or_default().push(r.rate);
                            if !r.note.is_empty() && rep == 0 {
                                notes.push(format!("{}: {}", t.name(), r.note));
                            } else if r.note.contains("MISMATCH") || r.note.contains("only") {
                                notes.push(format!("{} (run {}): {}", t.name(), rep + 1, r.note));
                            }
                        }
                        Err(e) => {
                            eprintln!("  {}: failed: {e:#}", t.name());
                            notes.push(format!("{} (run {}): failed: {e}", t.name(), rep + 1));
                        }
                    }
                }
            }
            let mut rates = BTreeMap::new();
            for (name, mut v) in samples {
                v.sort_by(f64::total_cmp);
                notes.push(format!(
                    "{name}: median of {}, range {}–{}",
                    v.len(),
                    crate::report::fmt_value(v.first().copied()),
                    crate::report::fmt_value(v.last().copied())
                ));
                rates.insert(name, percentile(&v, 0.5));
            }
            let window = if qos == 1 {
                format!(", ≤{} in flight each", b.args.window)
            } else {
                String::new()
            };
            table.push(
                row_from(
                    format!(
                        "QoS{qos}, {p} publisher{}{window}",
                        if p == 1 { "" } else { "s" }
                    ),
                    &rates,
                )
                .note(notes.join("; ")),
            );
        }
    }
    for t in b.targets.iter_mut() {
        t.kill().await;
    }
    table.push(Row::new("setup", None, None).note(
        "mooring: PUBACK only after the point is in SQLite (WAL, synchronous=FULL, fsync per group commit); \
         mosquitto: defaults, persistence off, no subscribers (messages are accepted and dropped)",
    ));
    Ok(table)
}

async fn ingest_case(
    t: &mut Target,
    args: &crate::BenchArgs,
    sources: &std::sync::Arc<client::SourceAddrs>,
    publishers: usize,
    qos: u8,
    seq_base: u64,
) -> anyhow::Result<IngestResult> {
    let total = args.messages.max(publishers);
    // Connect every publisher first (not timed).
    let conns = connect_publishers(t, sources, publishers).await?;
    let stored_before = t.metric("mooring_telemetry_messages_total").await?;
    let started = Instant::now();
    let (sent, acked) = publish_all(conns, total, qos, args, seq_base).await?;
    let client_elapsed = started.elapsed();
    let Some(before) = stored_before else {
        // Mosquitto: QoS 0 ends at each publisher's PINGRESP (all its PUBLISHes were read before it).
        let counted = if qos == 1 { acked } else { sent };
        return Ok(IngestResult {
            rate: counted as f64 / client_elapsed.as_secs_f64(),
            note: String::new(),
        });
    };
    // Ours: the store must hold what was acknowledged (QoS 1) or sent (QoS 0).
    let expect = if qos == 1 { acked } else { sent };
    let deadline = Instant::now() + STORE_CATCH_UP_TIMEOUT;
    let mut stored = 0usize;
    loop {
        if let Some(now) = t.metric("mooring_telemetry_messages_total").await? {
            stored = (now - before).max(0.0) as usize;
        }
        if stored >= expect || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stored_elapsed = started.elapsed();
    let note = if qos == 1 {
        if stored == acked {
            format!("verified: {stored} stored = {acked} acked")
        } else {
            format!("MISMATCH: {stored} stored vs {acked} acked")
        }
    } else if stored >= sent {
        format!("all {sent} stored (counted when stored)")
    } else {
        format!("only {stored} of {sent} stored after {STORE_CATCH_UP_TIMEOUT:?}")
    };
    let elapsed = if qos == 1 {
        client_elapsed
    } else {
        stored_elapsed
    };
    Ok(IngestResult {
        rate: stored.min(expect) as f64 / elapsed.as_secs_f64(),
        note,
    })
}

/// Connects the first `publishers` devices of `t` (32 at a time); returns (device id, connection).
async fn connect_publishers(
    t: &Target,
    sources: &std::sync::Arc<client::SourceAddrs>,
    publishers: usize,
) -> anyhow::Result<Vec<(String, client::Conn)>> {
    let endpoint = t.endpoint()?.clone();
    let creds = t.creds(publishers)?.to_vec();
    let mut conns = Vec::with_capacity(publishers);
    for chunk in creds.chunks(PUBLISHER_CONNECT_CONCURRENCY) {
        let mut set = tokio::task::JoinSet::new();
        for cred in chunk {
            let (ep, cred, src) = (endpoint.clone(), cred.clone(), sources.next());
            set.spawn(async move {
                let config = ep.tls_config(&cred)?;
                let conn = client::connect(&ep, config, &cred.id, src, 60).await?;
                anyhow::Ok((cred.id, conn))
            });
        }
        while let Some(r) = set.join_next().await {
            conns.push(r.context("connect task")??);
        }
    }
    Ok(conns)
}

/// Sends `total` messages split evenly over `conns`, all publishers at once, each bounded by
/// `--timeout-secs`; returns (sent, acknowledged).
async fn publish_all(
    conns: Vec<(String, client::Conn)>,
    total: usize,
    qos: u8,
    args: &crate::BenchArgs,
    seq_base: u64,
) -> anyhow::Result<(usize, usize)> {
    let publishers = conns.len().max(1);
    let mut set = tokio::task::JoinSet::new();
    for (i, (id, conn)) in conns.into_iter().enumerate() {
        let n = total / publishers + usize::from(i < total % publishers);
        anyhow::ensure!(
            n <= MESSAGES_PER_PUBLISHER_MAX,
            "too many messages per publisher"
        );
        let window = args.window.max(1);
        let timeout = args.timeout();
        set.spawn(async move {
            tokio::time::timeout(timeout, publish(conn, id, qos, n, window, seq_base))
                .await
                .context("publisher timed out")?
        });
    }
    let (mut sent, mut acked) = (0usize, 0usize);
    while let Some(r) = set.join_next().await {
        let (s, a) = r.context("publisher task")??;
        sent += s;
        acked += a;
    }
    Ok((sent, acked))
}

/// Publishes `n` telemetry messages; returns (sent, acknowledged). QoS 1 keeps ≤ `window` in
/// flight; QoS 0 ends with a PINGREQ/PINGRESP so everything sent was read by the server.
async fn publish(
    mut conn: client::Conn,
    id: String,
    qos: u8,
    n: usize,
    window: usize,
    seq_base: u64,
) -> anyhow::Result<(usize, usize)> {
    let topic = format!("devices/{id}/telemetry");
    let payload = |k: usize| format!("{{\"seq\":{},\"v\":1.0}}", seq_base + k as u64);
    if qos == 0 {
        for k in 0..n {
            conn.queue_publish(&topic, payload(k).as_bytes(), 0, 0);
            if conn.queued_len() >= QOS0_WRITE_CHUNK_BYTES {
                conn.flush().await?;
            }
        }
        conn.queue_pingreq();
        conn.flush().await?;
        loop {
            match conn.read_packet().await? {
                Some(Packet::PingResp) => break,
                Some(_) => {}
                None => bail!("closed before PINGRESP"),
            }
        }
        conn.close().await;
        return Ok((n, 0));
    }
    let (mut sent, mut acked, mut in_flight) = (0usize, 0usize, 0usize);
    let mut packet_id: u16 = 1;
    while acked < n {
        while in_flight < window && sent < n {
            conn.queue_publish(&topic, payload(sent).as_bytes(), 1, packet_id);
            packet_id = packet_id.checked_add(1).unwrap_or(1);
            sent += 1;
            in_flight += 1;
        }
        conn.flush().await?;
        match conn.read_packet().await? {
            Some(Packet::PubAck { .. }) => {
                acked += 1;
                in_flight -= 1;
            }
            Some(_) => {}
            None => bail!("closed after {acked} PUBACKs"),
        }
    }
    conn.close().await;
    Ok((sent, acked))
}

/// Suite 3: time for N devices to reconnect after `kill -9` and restart of the server.
pub async fn connect_storm(b: &mut Bench) -> anyhow::Result<Table> {
    let mut table =
        Table::new("connect storm: reconnect after kill -9 and restart (lower is better)");
    for n in b.args.storm_connections() {
        if let Some(note) = over_fd_limit(b, n) {
            let nn = crate::report::fmt_value(Some(n as f64));
            table.push(
                Row::new(format!("kill -9 → all {nn} reconnected, s"), None, None).note(note),
            );
            continue;
        }
        let mut restart = BTreeMap::new();
        let mut after_listen = BTreeMap::new();
        let mut total = BTreeMap::new();
        let mut notes = Vec::new();
        for t in b.targets.iter_mut() {
            eprintln!("connect-storm: {} with {n} devices", t.name());
            fresh_start(t, n).await?;
            let opts = FleetOpts {
                keepalive_secs: IDLE_KEEPALIVE_SECS,
                reconnect: true,
                attempts_max: u32::MAX,
                concurrency: b.args.connect_concurrency,
                respond_to_commands: false,
            };
            let Some(fleet) = spawn_connected(
                t,
                n,
                b.sources.clone(),
                opts,
                b.args.timeout(),
                "connected initially",
                &mut notes,
            )
            .await?
            else {
                continue;
            };
            let errors_before = fleet.stats.connect_errors();
            fleet.set_epoch(1);
            let killed = Instant::now();
            t.kill().await;
            t.start().await?;
            let listening = killed.elapsed();
            let all = fleet
                .wait_until(b.args.timeout(), |s| s.connacked(1) >= n)
                .await;
            let done = killed.elapsed();
            let back = fleet.stats.connacked(1);
            let retries = fleet.stats.connect_errors() - errors_before;
            fleet.shutdown().await;
            t.kill().await;
            eprintln!(
                "  {}: listening after {:.2} s, {back}/{n} back after {:.2} s ({retries} failed attempts)",
                t.name(),
                listening.as_secs_f64(),
                done.as_secs_f64()
            );
            notes.push(format!("{}: {retries} failed attempts", t.name()));
            if !all {
                notes.push(format!(
                    "{}: only {back} of {n} back within the timeout",
                    t.name()
                ));
                continue;
            }
            restart.insert(t.name(), listening.as_secs_f64());
            after_listen.insert(t.name(), (done - listening).as_secs_f64());
            total.insert(t.name(), done.as_secs_f64());
        }
        let nn = crate::report::fmt_value(Some(n as f64));
        table.push(
            row_from(
                format!("kill -9 → listening again ({nn} online), s"),
                &restart,
            )
            .note("includes the kernel tearing down the killed process's sockets"),
        );
        table.push(
            row_from(
                format!("listening → all {nn} reconnected, s"),
                &after_listen,
            )
            .note(format!(
                "clients retry with full-jitter backoff ({}–{} ms), {} handshakes in flight",
                crate::fleet::BACKOFF_BASE.as_millis(),
                crate::fleet::BACKOFF_CAP.as_millis(),
                b.args.connect_concurrency
            )),
        );
        table.push(
            row_from(format!("kill -9 → all {nn} reconnected, s"), &total).note(notes.join("; ")),
        );
    }
    Ok(table)
}

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

/// The value at fraction `p` of sorted `v` (nearest rank); 0 when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
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

/// The backend's subscription in the fan-out suite.
pub const FANOUT_FILTER: &str = "devices/+/telemetry";
/// Session-queue bytes the fan-out suite allows per message (topic + payload is about 70).
const FANOUT_QUEUE_BYTES_PER_MESSAGE: usize = 256;
/// The servers' default session-queue bound, kept when a case needs less.
const FANOUT_QUEUE_LEN_MIN: usize = 1_000;
const FANOUT_QUEUE_BYTES_MIN: usize = 4 * 1024 * 1024;
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

/// The medians per column and a note with their spreads.
fn medians(samples: &BTreeMap<&'static str, Vec<f64>>) -> (BTreeMap<&'static str, f64>, String) {
    let mut out = BTreeMap::new();
    let mut notes = Vec::new();
    for (&name, v) in samples {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        notes.push(format!(
            "{name}: median of {}, range {}–{}",
            v.len(),
            crate::report::fmt_value(v.first().copied()),
            crate::report::fmt_value(v.last().copied())
        ));
        out.insert(name, percentile(&v, 0.5));
    }
    (out, notes.join("; "))
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
    let rate = |n: usize, d: Duration| {
        if d > Duration::ZERO {
            n as f64 / d.as_secs_f64()
        } else {
            0.0
        }
    };
    Ok(FanoutRun {
        acked_rate: rate(acked, acked_elapsed),
        delivered_rate: rate(delivered, delivered_elapsed),
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
async fn receive_all(
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
