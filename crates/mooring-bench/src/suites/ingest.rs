//! Suite 2: QoS 0/1 telemetry ingest, from publish to the store.

use super::fanout::{
    receive_all, FANOUT_QUEUE_BYTES_MIN, FANOUT_QUEUE_BYTES_PER_MESSAGE, FANOUT_QUEUE_LEN_MIN,
};
use super::publishers::{connect_publishers, publish_all, MESSAGES_PER_PUBLISHER_MAX};
use super::{fresh_start, medians, per_sec, percentile, row_from, FANOUT_FILTER};
use crate::client::{self};
use crate::report::{Row, Table};
use crate::target::{self, Kind, Target};
use crate::Bench;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Longest the store may lag behind what a publisher sent or had acknowledged.
const STORE_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

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
            let (rates, spread) = medians(&samples);
            if !spread.is_empty() {
                notes.push(spread);
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
            if qos == 1 && p == 1 {
                if let Some(row) =
                    fsync_bound_row(b, rates.get(Kind::Mooring.name()).copied()).await?
                {
                    table.push(row);
                }
            }
            // The fair peers: Mosquitto relaying everything to one subscriber (data that goes
            // somewhere), and, with --mosquitto-persistence, doing so with `persistence true`.
            let mooring_rate = rates.get(Kind::Mooring.name()).copied();
            let mut variants = vec![false];
            if b.args.mosquitto_persistence {
                variants.push(true);
            }
            for persistence in variants {
                let seq_base = seq_base_for(b);
                if let Some(row) = relay_row(b, qos, p, persistence, seq_base, mooring_rate).await?
                {
                    table.push(row);
                }
            }
        }
    }
    for t in b.targets.iter_mut() {
        t.kill().await;
        t.set_persistence(false)?;
    }
    table.push(Row::new("setup", None, None).note(
        "mooring: PUBACK only after the point is in SQLite (WAL, synchronous=FULL, fsync per group commit); \
         mosquitto: defaults, persistence off, no subscribers (messages are accepted and dropped); \
         'relaying to 1 subscriber' rows: mosquitto's rate is what one subscriber (QoS as published, \
         clean session, devices/+/telemetry, queue bounds that hold a whole case) received per \
         second, next to ours stored per second",
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

/// A sequence base for a case of its own (so a relay run's seqs never repeat an earlier run's).
fn seq_base_for(b: &mut Bench) -> u64 {
    let case = b.next_case();
    b.seq_base + case * MESSAGES_PER_PUBLISHER_MAX as u64
}

/// One row: Mosquitto relaying a `qos`/`publishers` ingest case to one subscriber (median of
/// `--repeat` runs), beside ours stored. `None` without a Mosquitto target.
async fn relay_row(
    b: &mut Bench,
    qos: u8,
    publishers: usize,
    persistence: bool,
    seq_base: u64,
    mooring_rate: Option<f64>,
) -> anyhow::Result<Option<Row>> {
    let (args, sources) = (b.args.clone(), b.sources.clone());
    let Some(t) = b.targets.iter_mut().find(|t| t.kind == Kind::Mosquitto) else {
        return Ok(None);
    };
    // Room in the subscriber's queue for a whole case (as in the fan-out suite): Mosquitto's
    // default of 1,000 queued messages would drop most of a fast case's QoS 1 messages.
    let total = args.messages.max(publishers);
    t.set_queue_bounds(Some(target::QueueBounds {
        len_max: total.max(FANOUT_QUEUE_LEN_MIN),
        bytes_max: (total * FANOUT_QUEUE_BYTES_PER_MESSAGE).max(FANOUT_QUEUE_BYTES_MIN),
    }));
    t.set_persistence(persistence)?;
    fresh_start(t, publishers).await?;
    let mut rates = Vec::new();
    let mut notes = Vec::new();
    for rep in 0..args.repeat.max(1) {
        let base = seq_base + rep as u64 * (args.messages as u64 + 1);
        match relay_case(t, &args, &sources, publishers, qos, base).await {
            Ok((rate, note)) => {
                eprintln!("  mosquitto relaying to 1 subscriber: {rate:.0} msg/s {note}");
                if !note.is_empty() {
                    notes.push(note);
                }
                rates.push(rate);
            }
            Err(e) => notes.push(format!("run {}: failed: {e}", rep + 1)),
        }
    }
    // The next ingest case measures the default Mosquitto again.
    t.set_queue_bounds(None);
    t.set_persistence(false)?;
    fresh_start(t, publishers).await?;
    rates.sort_by(f64::total_cmp);
    let label = format!(
        "QoS{qos}, {publishers} publisher{}, mosquitto relaying to 1 subscriber{}",
        if publishers == 1 { "" } else { "s" },
        if persistence {
            ", persistence true"
        } else {
            ""
        }
    );
    let median = (!rates.is_empty()).then(|| percentile(&rates, 0.5));
    Ok(Some(
        Row::new(label, mooring_rate, median).note(notes.join("; ")),
    ))
}

/// Publishes an ingest case while one subscriber receives everything; the rate is what the
/// subscriber received per second, from the first publish to the last message it got.
async fn relay_case(
    t: &mut Target,
    args: &crate::BenchArgs,
    sources: &std::sync::Arc<client::SourceAddrs>,
    publishers: usize,
    qos: u8,
    seq_base: u64,
) -> anyhow::Result<(f64, String)> {
    let total = args.messages.max(publishers);
    let ep = t.endpoint()?.clone();
    let backend = t.backend_login().await?;
    let opts = client::ConnectOpts {
        keepalive_secs: super::IDLE_KEEPALIVE_SECS,
        clean_session: true,
        login: backend.login.clone(),
    };
    let (mut sub, _) = client::connect_with(
        &ep,
        backend.tls.clone(),
        target::BACKEND_CLIENT_ID,
        sources.next(),
        &opts,
    )
    .await?;
    sub.subscribe(FANOUT_FILTER, qos).await?;
    let deadline = tokio::time::Instant::now() + args.timeout();
    let conns = connect_publishers(t, sources, publishers).await?;
    let started = Instant::now();
    let receiver = tokio::spawn(receive_all(sub, total, deadline));
    let published = publish_all(conns, total, qos, args, seq_base).await;
    let (sent, _) = match published {
        Ok(r) => r,
        Err(e) => {
            receiver.abort();
            return Err(e);
        }
    };
    let (got, last) = receiver
        .await
        .map_err(|e| anyhow::anyhow!("subscriber task: {e}"))??;
    let elapsed = last.map_or(Duration::ZERO, |l| l - started);
    let rate = per_sec(got, elapsed);
    let note = if got < sent {
        format!("the subscriber received {got} of {sent}")
    } else {
        String::new()
    };
    Ok((rate, note))
}

/// fsyncs timed by [`fsync_latency_ms`].
const FSYNC_SAMPLES: usize = 200;

/// One publisher's QoS 1 rate is bounded by how fast the disk makes a write durable: at most
/// `window` messages per commit, one commit per fsync. This row states that bound for the disk
/// under our data dir and our rate as a share of it.
async fn fsync_bound_row(b: &Bench, ours: Option<f64>) -> anyhow::Result<Option<Row>> {
    let Some(dir) = b
        .targets
        .iter()
        .find_map(|t| t.data_dir().map(std::path::Path::to_path_buf))
    else {
        return Ok(None);
    };
    let (p50, p99) = tokio::task::spawn_blocking(move || fsync_latency_ms(&dir, FSYNC_SAMPLES))
        .await
        .map_err(|e| anyhow::anyhow!("fsync probe: {e}"))??;
    let window = b.args.window.max(1) as f64;
    let bound = window / (p50 / 1000.0);
    let share = ours.map_or_else(
        || "ours not measured".to_owned(),
        |r| format!("ours = {:.0} % of it", 100.0 * r / bound),
    );
    Ok(Some(
        Row::new(
            "QoS1, 1 publisher: fsync bound (in flight ÷ p50 fsync)",
            Some(bound),
            None,
        )
        .note(format!(
            "{share}; this disk's fsync (4 KiB write + fdatasync, {FSYNC_SAMPLES} samples in the data dir): p50 {p50:.2} ms, p99 {p99:.2} ms; {window} in flight"
        )),
    ))
}

/// p50 and p99, in ms, of rewriting 4 KiB of a file in `dir` and `fdatasync`ing it.
fn fsync_latency_ms(dir: &std::path::Path, samples: usize) -> anyhow::Result<(f64, f64)> {
    use std::io::{Seek, SeekFrom, Write};
    let path = dir.join("bench-fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    let block = [0x5au8; 4096];
    let mut ms = Vec::with_capacity(samples);
    for _ in 0..samples.max(1) {
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&block)?;
        let started = Instant::now();
        f.sync_data()?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    ms.sort_by(f64::total_cmp);
    Ok((percentile(&ms, 0.5), percentile(&ms, 0.99)))
}
