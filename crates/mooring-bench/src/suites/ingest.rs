//! Suite 2: QoS 0/1 telemetry ingest, from publish to the store.

use super::publishers::{connect_publishers, publish_all, MESSAGES_PER_PUBLISHER_MAX};
use super::{fresh_start, percentile, row_from};
use crate::client::{self};
use crate::report::{Row, Table};
use crate::target::Target;
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
