//! Conformance cases for the group-commit [`TelemetryWriter`](crate::TelemetryWriter) and the retention pass over a backend.

use super::*;

pub async fn writer_group_commits_concurrent_appends_and_reports_duplicates(store: Arc<dyn Store>) {
    const APPENDS: u64 = 200;
    const DUPLICATES: u64 = 20;
    let telemetry: Arc<dyn TelemetryStore> = store.clone();
    let (writer, task) = TelemetryWriter::spawn(
        telemetry,
        TelemetryWriterConfig {
            queue_len_max: 1024,
            batch_len_max: 64,
            ..TelemetryWriterConfig::default()
        },
    );
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..APPENDS {
        let writer = writer.clone();
        // The last DUPLICATES records repeat the seqs of the first ones.
        let seq = if i >= APPENDS - DUPLICATES {
            i - (APPENDS - DUPLICATES)
        } else {
            i
        };
        appends.spawn(async move {
            writer
                .append(rec("d1", Some(seq), 1_000 + i, &[("t", num(1.0))]))
                .await
        });
    }
    let mut duplicates = 0;
    while let Some(joined) = appends.join_next().await {
        if joined.expect("append task").expect("append") == AppendOutcome::Duplicate {
            duplicates += 1;
        }
    }
    assert_eq!(duplicates, DUPLICATES);
    let stats = writer.stats();
    assert_eq!(stats.records, APPENDS);
    assert_eq!(stats.duplicates, DUPLICATES);
    assert!(
        stats.batches < APPENDS,
        "expected group commit, got {} batches for {APPENDS} appends",
        stats.batches
    );
    assert_eq!(stats.batches_failed, 0);
    assert_eq!(stats.queue_len, 0);
    assert!(stats.total_batch_latency_us >= stats.last_batch_latency_us);
    let stored = store.query(all_points("d1")).await.expect("query").len();
    assert_eq!(u64::try_from(stored).expect("fits"), APPENDS - DUPLICATES);
    drop(writer);
    task.await.expect("writer task exits cleanly");
}

pub async fn writer_drains_queue_and_stops_when_handles_are_dropped(store: Arc<dyn Store>) {
    let telemetry: Arc<dyn TelemetryStore> = store.clone();
    let (writer, task) = TelemetryWriter::spawn(
        telemetry,
        TelemetryWriterConfig {
            queue_len_max: 8,
            batch_len_max: 3,
            ..TelemetryWriterConfig::default()
        },
    );
    let second = writer.clone();
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..20u64 {
        let w = if i % 2 == 0 {
            writer.clone()
        } else {
            second.clone()
        };
        appends.spawn(async move { w.append(rec("d1", Some(i), i, &[("t", num(1.0))])).await });
    }
    drop(writer);
    drop(second);
    while let Some(joined) = appends.join_next().await {
        assert_eq!(
            joined.expect("task").expect("append"),
            AppendOutcome::Stored
        );
    }
    task.await
        .expect("writer stops after its last handle is dropped");
    assert_eq!(count_points(&*store, "d1").await, 20);
}

pub async fn writer_refuses_invalid_record_without_failing_others(store: Arc<dyn Store>) {
    let telemetry: Arc<dyn TelemetryStore> = store.clone();
    let (writer, task) = TelemetryWriter::spawn(telemetry, TelemetryWriterConfig::default());
    let bad = writer.append(rec("d1", Some(1), TS_MS_MAX + 1, &[("t", num(1.0))]));
    let good = writer.append(rec("d1", Some(2), 5, &[("t", num(1.0))]));
    let (bad, good) = tokio::join!(bad, good);
    assert_eq!(bad.expect_err("invalid").kind(), "invalid_input");
    assert_eq!(good.expect("valid record stored"), AppendOutcome::Stored);
    assert_eq!(writer.stats().batches_failed, 0);
    drop(writer);
    task.await.expect("writer exits");
}

pub async fn retention_pass_deletes_everything_old_in_chunks(store: Arc<dyn Store>) {
    let batch = (0..250u64)
        .map(|i| rec("d1", Some(i), i, &[("t", num(1.0)), ("u", num(2.0))]))
        .collect();
    append(&*store, batch).await;
    // 200 records older than the cutoff: 400 points + 200 dedupe keys.
    let deleted = run_retention_pass(&*store, 200, 64)
        .await
        .expect("retention pass");
    assert_eq!(deleted, 600);
    assert_eq!(count_points(&*store, "d1").await, 100);
    assert_eq!(
        run_retention_pass(&*store, 200, 64).await.expect("again"),
        0
    );
    let err = run_retention_pass(&*store, 200, 0)
        .await
        .expect_err("chunk 0");
    assert_eq!(err.kind(), "invalid_input");
}
