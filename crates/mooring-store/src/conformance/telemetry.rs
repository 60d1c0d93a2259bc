//! Conformance cases for [`TelemetryStore`](crate::TelemetryStore): append, dedupe, query, latest, retention.

use super::*;

pub async fn telemetry_append_then_query_round_trips(store: &dyn Store) {
    let outcomes = append(
        store,
        vec![
            rec(
                "d1",
                Some(1),
                1_000,
                &[("temp", num(21.5)), ("hum", num(40.0))],
            ),
            rec("d1", Some(2), 2_000, &[("temp", num(-3.25))]),
        ],
    )
    .await;
    assert_eq!(outcomes, [AppendOutcome::Stored, AppendOutcome::Stored]);
    let points = store.query(all_points("d1")).await.expect("query");
    assert_eq!(
        points,
        [
            Point {
                metric: "temp".into(),
                ts_ms: 1_000,
                value: num(21.5)
            },
            Point {
                metric: "hum".into(),
                ts_ms: 1_000,
                value: num(40.0)
            },
            Point {
                metric: "temp".into(),
                ts_ms: 2_000,
                value: num(-3.25)
            },
        ],
        "ts ascending, ties in insertion order"
    );
    assert!(store
        .query(all_points("other"))
        .await
        .expect("query")
        .is_empty());
}

pub async fn telemetry_duplicate_seq_in_one_batch_is_stored_once(store: &dyn Store) {
    let outcomes = append(
        store,
        vec![
            rec("d1", Some(7), 1_000, &[("t", num(1.0))]),
            rec("d1", Some(7), 1_000, &[("t", num(1.0))]),
            rec("d1", Some(8), 1_001, &[("t", num(2.0))]),
            rec("d1", Some(7), 1_002, &[("t", num(3.0))]),
        ],
    )
    .await;
    use AppendOutcome::{Duplicate, Stored};
    assert_eq!(outcomes, [Stored, Duplicate, Stored, Duplicate]);
    assert_eq!(count_points(store, "d1").await, 2);
}

pub async fn telemetry_duplicate_seq_across_batches_is_stored_once(store: &dyn Store) {
    use AppendOutcome::{Duplicate, Stored};
    let first = append(
        store,
        vec![
            rec("d1", Some(1), 1_000, &[("t", num(1.0))]),
            rec("d1", Some(u64::MAX), 1_000, &[("t", num(1.0))]),
        ],
    )
    .await;
    assert_eq!(first, [Stored, Stored]);
    let second = append(
        store,
        vec![
            rec("d1", Some(u64::MAX), 1_500, &[("t", num(5.0))]),
            rec("d1", Some(2), 2_000, &[("t", num(2.0))]),
            rec("d1", Some(1), 2_000, &[("t", num(9.0))]),
        ],
    )
    .await;
    assert_eq!(second, [Duplicate, Stored, Duplicate]);
    assert_eq!(count_points(store, "d1").await, 3);
    let latest = store.latest("d1").await.expect("latest");
    assert_eq!(
        latest.get("t"),
        Some(&(2_000, num(2.0))),
        "duplicates do not touch latest"
    );
}

pub async fn telemetry_seq_is_per_device_and_none_is_always_stored(store: &dyn Store) {
    use AppendOutcome::Stored;
    let outcomes = append(
        store,
        vec![
            rec("d1", Some(1), 1_000, &[("t", num(1.0))]),
            rec("d2", Some(1), 1_000, &[("t", num(1.0))]),
            rec("d1", None, 1_000, &[("t", num(1.0))]),
            rec("d1", None, 1_000, &[("t", num(1.0))]),
        ],
    )
    .await;
    assert_eq!(outcomes, [Stored, Stored, Stored, Stored]);
    assert_eq!(count_points(store, "d1").await, 3);
    assert_eq!(count_points(store, "d2").await, 1);
    // A record without points still claims its seq.
    assert_eq!(
        append(store, vec![rec("d3", Some(5), 1, &[])]).await,
        [Stored]
    );
    assert_eq!(
        append(store, vec![rec("d3", Some(5), 2, &[("t", num(1.0))])]).await,
        [AppendOutcome::Duplicate]
    );
}

pub async fn telemetry_query_filters_and_orders(store: &dyn Store) {
    // Arrives out of order; stored for two metrics and another device.
    let batch = [30u64, 10, 50, 20, 40]
        .iter()
        .map(|ts| {
            #[allow(clippy::cast_precision_loss)]
            let v = *ts as f64;
            rec("d1", None, *ts, &[("a", num(v)), ("b", num(-v))])
        })
        .chain([rec("d2", None, 25, &[("a", num(0.0))])])
        .collect();
    append(store, batch).await;

    let q = |metric: Option<&str>, from_ms: Option<u64>, to_ms: Option<u64>, limit: usize| {
        TelemetryQuery {
            device_id: id("d1"),
            metric: metric.map(str::to_owned),
            from_ms,
            to_ms,
            limit,
        }
    };
    let ts_of = |points: Vec<Point>| points.into_iter().map(|p| p.ts_ms).collect::<Vec<_>>();

    let a = store.query(q(Some("a"), None, None, 100)).await.expect("a");
    assert!(a.iter().all(|p| p.metric == "a"));
    assert_eq!(
        a.iter().map(|p| p.ts_ms).collect::<Vec<_>>(),
        [10, 20, 30, 40, 50]
    );
    assert_eq!(a[0].value, num(10.0));

    let both = store.query(q(None, None, None, 100)).await.expect("all");
    assert_eq!(ts_of(both), [10, 10, 20, 20, 30, 30, 40, 40, 50, 50]);

    // from inclusive, to exclusive.
    let window = store
        .query(q(Some("b"), Some(20), Some(40), 100))
        .await
        .expect("window");
    assert_eq!(ts_of(window), [20, 30]);
    let from_only = store
        .query(q(Some("a"), Some(35), None, 100))
        .await
        .expect("from");
    assert_eq!(ts_of(from_only), [40, 50]);
    let to_only = store
        .query(q(Some("a"), None, Some(11), 100))
        .await
        .expect("to");
    assert_eq!(ts_of(to_only), [10]);
    let empty = store
        .query(q(Some("a"), Some(40), Some(40), 100))
        .await
        .expect("empty");
    assert!(empty.is_empty());
    let to_zero = store
        .query(q(None, None, Some(0), 100))
        .await
        .expect("to 0");
    assert!(to_zero.is_empty());
    let huge = store
        .query(q(Some("a"), Some(0), Some(u64::MAX), 100))
        .await
        .expect("huge");
    assert_eq!(huge.len(), 5);

    // limit keeps the oldest.
    let limited = store
        .query(q(Some("a"), Some(15), None, 2))
        .await
        .expect("limit");
    assert_eq!(ts_of(limited), [20, 30]);
    assert!(store
        .query(q(None, None, None, 0))
        .await
        .expect("limit 0")
        .is_empty());

    assert!(store
        .query(q(Some("zzz"), None, None, 10))
        .await
        .expect("none")
        .is_empty());
}

pub async fn telemetry_latest_is_newest_point_per_metric(store: &dyn Store) {
    assert!(store.latest("d1").await.expect("latest empty").is_empty());
    append(
        store,
        vec![
            rec(
                "d1",
                None,
                2_000,
                &[("t", num(2.0)), ("on", MetricValue::Bool(true))],
            ),
            rec("d1", None, 1_000, &[("t", num(1.0))]),
            rec("d2", None, 9_000, &[("t", num(99.0))]),
        ],
    )
    .await;
    // An older point arriving later does not replace a newer one.
    append(
        store,
        vec![rec("d1", None, 1_500, &[("t", num(1.5)), ("h", num(50.0))])],
    )
    .await;
    let latest = store.latest("d1").await.expect("latest");
    let expected: BTreeMap<String, (u64, MetricValue)> = [
        ("t".to_owned(), (2_000, num(2.0))),
        ("on".to_owned(), (2_000, MetricValue::Bool(true))),
        ("h".to_owned(), (1_500, num(50.0))),
    ]
    .into_iter()
    .collect();
    assert_eq!(latest, expected);
    append(store, vec![rec("d1", None, 3_000, &[("t", num(3.0))])]).await;
    let latest = store.latest("d1").await.expect("latest");
    assert_eq!(latest.get("t"), Some(&(3_000, num(3.0))));
    // Two points at one time in one batch: the later one is the latest, as if sent one by one.
    append(
        store,
        vec![
            rec("d1", None, 4_000, &[("t", num(4.0))]),
            rec("d1", None, 4_000, &[("t", num(4.5))]),
            rec("d1", None, 3_500, &[("t", num(3.5))]),
        ],
    )
    .await;
    let latest = store.latest("d1").await.expect("latest");
    assert_eq!(latest.get("t"), Some(&(4_000, num(4.5))));
}

pub async fn telemetry_booleans_round_trip_distinct_from_numbers(store: &dyn Store) {
    let values = [
        ("b_true", MetricValue::Bool(true)),
        ("b_false", MetricValue::Bool(false)),
        ("n_one", num(1.0)),
        ("n_zero", num(0.0)),
        ("n_small", num(1e-300)),
        ("n_big", num(-1.5e300)),
    ];
    append(store, vec![rec("d1", Some(1), 1_000, &values)]).await;
    let points = store.query(all_points("d1")).await.expect("query");
    let got: Vec<(String, MetricValue)> = points.into_iter().map(|p| (p.metric, p.value)).collect();
    let want: Vec<(String, MetricValue)> =
        values.iter().map(|(m, v)| ((*m).to_owned(), *v)).collect();
    assert_eq!(got, want);
    let latest = store.latest("d1").await.expect("latest");
    for (metric, value) in values {
        assert_eq!(latest.get(metric), Some(&(1_000, value)), "{metric}");
    }
}

pub async fn telemetry_retention_deletes_only_old_rows_in_chunks(store: &dyn Store) {
    // 10 old points (ts 0..10) and 5 new ones (ts 100..105), no seq.
    let batch = (0..10)
        .chain(100..105)
        .map(|ts| rec("d1", None, ts, &[("t", num(1.0))]))
        .collect();
    append(store, batch).await;

    let mut chunks = Vec::new();
    loop {
        let deleted = store.delete_older_than(100, 4).await.expect("delete chunk");
        assert!(deleted <= 4, "at most max_rows per call, got {deleted}");
        if deleted == 0 {
            break;
        }
        chunks.push(deleted);
        assert!(chunks.len() <= 10, "retention must terminate");
    }
    assert_eq!(chunks, [4, 4, 2]);
    let left: Vec<u64> = store
        .query(all_points("d1"))
        .await
        .expect("query")
        .into_iter()
        .map(|p| p.ts_ms)
        .collect();
    assert_eq!(left, [100, 101, 102, 103, 104]);
    assert_eq!(store.delete_older_than(100, 0).await.expect("max 0"), 0);
    // The last known value survives retention.
    assert_eq!(
        store.latest("d1").await.expect("latest").get("t"),
        Some(&(104, num(1.0)))
    );
}

pub async fn telemetry_retention_prunes_dedupe_keys_with_points(store: &dyn Store) {
    append(
        store,
        vec![
            rec("d1", Some(1), 10, &[("t", num(1.0))]),
            rec("d1", Some(2), 200, &[("t", num(2.0))]),
        ],
    )
    .await;
    // Point + dedupe key of seq 1 are older than the cutoff; seq 2 is not.
    let deleted = run_retention_pass(store, 100, 1).await.expect("retention");
    assert_eq!(deleted, 2, "one point and one dedupe key");
    use AppendOutcome::{Duplicate, Stored};
    let outcomes = append(
        store,
        vec![
            rec("d1", Some(2), 200, &[("t", num(2.0))]),
            rec("d1", Some(1), 10, &[("t", num(1.0))]),
        ],
    )
    .await;
    assert_eq!(
        outcomes,
        [Duplicate, Stored],
        "pruned key is forgotten, kept key still dedupes"
    );
}

pub async fn telemetry_invalid_records_are_refused_whole(store: &dyn Store) {
    let err = store
        .append_batch(vec![
            rec("d1", Some(1), 1_000, &[("t", num(1.0))]),
            rec("d1", Some(2), TS_MS_MAX + 1, &[("t", num(1.0))]),
        ])
        .await
        .expect_err("timestamp out of range");
    assert_eq!(err.kind(), "invalid_input", "{err:?}");
    let err = store
        .append_batch(vec![rec("d1", Some(3), 1_000, &[("t", num(f64::NAN))])])
        .await
        .expect_err("NaN");
    assert_eq!(err.kind(), "invalid_input", "{err:?}");
    assert_eq!(
        count_points(store, "d1").await,
        0,
        "nothing of a failed batch is stored"
    );
    // Their seqs were not consumed.
    assert_eq!(
        append(store, vec![rec("d1", Some(1), 1_000, &[("t", num(1.0))])]).await,
        [AppendOutcome::Stored]
    );
    // The largest storable time is fine.
    assert_eq!(
        append(store, vec![rec("d1", None, TS_MS_MAX, &[("t", num(1.0))])]).await,
        [AppendOutcome::Stored]
    );
}

pub async fn telemetry_empty_batch_is_ok(store: &dyn Store) {
    assert!(append(store, Vec::new()).await.is_empty());
}

/// 2026-01-01T00:00:00Z: a whole hour, day and minute.
const T0: u64 = 1_767_225_600_000;
const HOUR_MS: u64 = 3_600_000;

/// Compacts everything closed before `closed_before_ms` (as the server's pass does, bounded).
async fn compact_all(store: &dyn Store, closed_before_ms: u64) {
    crate::run_compaction_pass(store, closed_before_ms, 7, 1_000)
        .await
        .expect("compaction pass");
    assert_eq!(
        store.compact(closed_before_ms, 7).await.expect("compact"),
        0,
        "a finished pass leaves nothing to compact"
    );
}

fn query(
    device: &str,
    metric: Option<&str>,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    limit: usize,
) -> TelemetryQuery {
    TelemetryQuery {
        device_id: id(device),
        metric: metric.map(str::to_owned),
        from_ms,
        to_ms,
        limit,
    }
}

/// Three hours of two metrics every 10 minutes (plus a boolean), with seqs.
fn three_hours(device: &str) -> Vec<TelemetryRecord> {
    (0..18u64)
        .map(|i| {
            #[allow(clippy::cast_precision_loss)]
            let v = 20.0 + i as f64 / 10.0;
            rec(
                device,
                Some(1_000 + i),
                T0 + i * 600_000,
                &[
                    ("temp", num(v)),
                    ("hum", num(40.0 - v)),
                    ("door", MetricValue::Bool(i % 3 == 0)),
                ],
            )
        })
        .collect()
}

pub async fn telemetry_query_spans_compacted_and_recent_points(store: &dyn Store) {
    append(store, three_hours("d1")).await;
    append(store, three_hours("d2")).await;
    let queries = [
        query("d1", None, None, None, 10_000),
        query("d1", Some("temp"), None, None, 10_000),
        query(
            "d1",
            Some("door"),
            Some(T0 + HOUR_MS - 1),
            Some(T0 + 2 * HOUR_MS + 1),
            10_000,
        ),
        query(
            "d1",
            None,
            Some(T0 + 1_800_000),
            Some(T0 + 2 * HOUR_MS + 600_000),
            10_000,
        ),
        query("d1", None, Some(T0 + HOUR_MS + 1), None, 5),
        query(
            "d1",
            Some("hum"),
            None,
            Some(T0 + 2 * HOUR_MS + 600_001),
            10_000,
        ),
    ];
    let mut before = Vec::new();
    for q in &queries {
        before.push(store.query(q.clone()).await.expect("query before"));
    }
    assert_eq!(before[0].len(), 54);
    let latest_before = store.latest("d1").await.expect("latest");
    // The first two hours become chunks; the third stays recent.
    compact_all(store, T0 + 2 * HOUR_MS).await;
    for (q, want) in queries.iter().zip(&before) {
        assert_eq!(&store.query(q.clone()).await.expect("query"), want, "{q:?}");
    }
    assert_eq!(store.latest("d1").await.expect("latest"), latest_before);
    // Compacting again (and everything) changes nothing either.
    compact_all(store, T0 + 2 * HOUR_MS).await;
    compact_all(store, T0 + 10 * HOUR_MS).await;
    for (q, want) in queries.iter().zip(&before) {
        assert_eq!(&store.query(q.clone()).await.expect("query"), want, "{q:?}");
    }
    // Dedupe keys of compacted windows still dedupe.
    use AppendOutcome::{Duplicate, Stored};
    let outcomes = append(
        store,
        vec![
            rec("d1", Some(1_000), T0, &[("temp", num(99.0))]),
            rec("d1", Some(1_017), T0 + 5, &[("temp", num(99.0))]),
            rec("d1", Some(999), T0, &[("temp", num(19.9))]),
        ],
    )
    .await;
    assert_eq!(outcomes, [Duplicate, Duplicate, Stored]);
}

pub async fn telemetry_late_points_into_a_compacted_window_are_merged(store: &dyn Store) {
    append(store, three_hours("d1")).await;
    compact_all(store, T0 + 3 * HOUR_MS).await;
    // Late: into the first (compacted) hour, one tying an existing timestamp, one older than
    // anything stored, and one duplicate seq (its original is in a compacted window).
    use AppendOutcome::{Duplicate, Stored};
    let outcomes = append(
        store,
        vec![
            rec("d1", Some(5_000), T0 + 600_000, &[("temp", num(-1.0))]),
            rec("d1", Some(5_001), T0 - 1, &[("temp", num(-2.0))]),
            rec("d1", Some(1_005), T0 + 1, &[("temp", num(-3.0))]),
        ],
    )
    .await;
    assert_eq!(outcomes, [Stored, Stored, Duplicate]);
    let temp = |points: Vec<Point>| {
        points
            .into_iter()
            .map(|p| (p.ts_ms, p.value))
            .take(4)
            .collect::<Vec<_>>()
    };
    let want = vec![
        (T0 - 1, num(-2.0)),
        (T0, num(20.0)),
        (T0 + 600_000, num(20.1)),
        (T0 + 600_000, num(-1.0)),
    ];
    let q = query("d1", Some("temp"), None, None, 100);
    assert_eq!(temp(store.query(q.clone()).await.expect("merged")), want);
    assert_eq!(store.query(q.clone()).await.expect("count").len(), 20);
    compact_all(store, T0 + 3 * HOUR_MS).await;
    assert_eq!(
        temp(store.query(q.clone()).await.expect("recompacted")),
        want,
        "the next pass rewrites the window's chunk with them, same order"
    );
    assert_eq!(store.query(q).await.expect("count").len(), 20);
    assert_eq!(
        append(
            store,
            vec![rec("d1", Some(5_001), T0, &[("temp", num(0.0))])]
        )
        .await,
        [Duplicate]
    );
    assert_eq!(
        store.latest("d1").await.expect("latest").get("temp"),
        Some(&(T0 + 17 * 600_000, num(21.7))),
        "late points do not replace the latest value"
    );
}

pub async fn telemetry_retention_across_chunks_is_exact(store: &dyn Store) {
    append(store, three_hours("d1")).await;
    compact_all(store, T0 + 2 * HOUR_MS).await;
    // The cutoff falls inside the second (compacted) hour.
    let cutoff = T0 + HOUR_MS + 1_200_000;
    let mut calls = 0;
    loop {
        let deleted = store.delete_older_than(cutoff, 2).await.expect("delete");
        assert!(deleted <= 2, "at most max_rows per call, got {deleted}");
        if deleted == 0 {
            break;
        }
        calls += 1;
        assert!(calls <= 100, "retention must terminate");
    }
    let points = store
        .query(query("d1", None, None, None, 10_000))
        .await
        .expect("query");
    assert_eq!(points.len(), 3 * 10, "{points:?}");
    assert!(points.iter().all(|p| p.ts_ms >= cutoff));
    assert_eq!(points[0].ts_ms, cutoff);
    // Dedupe keys went with their points, exactly at the cutoff.
    use AppendOutcome::{Duplicate, Stored};
    let outcomes = append(
        store,
        vec![
            rec("d1", Some(1_007), T0 + 7 * 600_000, &[]),
            rec("d1", Some(1_008), T0 + 8 * 600_000, &[]),
            rec("d1", Some(1_017), T0 + 17 * 600_000, &[]),
        ],
    )
    .await;
    assert_eq!(outcomes, [Stored, Duplicate, Duplicate]);
    assert_eq!(store.latest("d1").await.expect("latest").len(), 3);
    // Compaction after retention keeps the same answer.
    compact_all(store, T0 + 10 * HOUR_MS).await;
    let after = store
        .query(query("d1", None, None, None, 10_000))
        .await
        .expect("query");
    assert_eq!(after, points);
}

pub async fn telemetry_device_delete_removes_compacted_chunks(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("create");
    store.create_device(new_device("d2")).await.expect("create");
    append(store, three_hours("d1")).await;
    append(store, three_hours("d2")).await;
    compact_all(store, T0 + 2 * HOUR_MS).await;
    assert!(store.delete_device("d1").await.expect("delete"));
    assert_eq!(count_points(store, "d1").await, 0);
    assert!(store.latest("d1").await.expect("latest").is_empty());
    assert_eq!(count_points(store, "d2").await, 54);
    store
        .create_device(new_device("d1"))
        .await
        .expect("re-create");
    assert_eq!(
        append(
            store,
            vec![rec("d1", Some(1_000), T0, &[("temp", num(1.0))])]
        )
        .await,
        [AppendOutcome::Stored],
        "the compacted dedupe keys went with the device"
    );
    assert_eq!(count_points(store, "d1").await, 1);
    assert_eq!(
        append(
            store,
            vec![rec("d2", Some(1_000), T0, &[("temp", num(1.0))])]
        )
        .await,
        [AppendOutcome::Duplicate]
    );
}

pub async fn telemetry_limit_cuts_inside_a_chunk(store: &dyn Store) {
    let batch = (0..100u64)
        .map(|i| {
            #[allow(clippy::cast_precision_loss)]
            let v = i as f64;
            rec("d1", None, T0 + i * 1_000, &[("a", num(v)), ("b", num(-v))])
        })
        .collect();
    append(store, batch).await;
    compact_all(store, T0 + HOUR_MS).await;
    let ts = |points: Vec<Point>| points.into_iter().map(|p| p.ts_ms).collect::<Vec<_>>();
    let one = store
        .query(query("d1", Some("a"), Some(T0 + 10_500), None, 7))
        .await
        .expect("one metric");
    assert_eq!(
        ts(one),
        (11..18).map(|i| T0 + i * 1_000).collect::<Vec<_>>()
    );
    let both = store
        .query(query("d1", None, Some(T0 + 10_000), Some(T0 + 50_000), 5))
        .await
        .expect("all metrics");
    let got: Vec<(String, u64)> = both.into_iter().map(|p| (p.metric, p.ts_ms)).collect();
    let want: Vec<(String, u64)> = [("a", 10), ("b", 10), ("a", 11), ("b", 11), ("a", 12)]
        .iter()
        .map(|(m, i)| ((*m).to_owned(), T0 + i * 1_000))
        .collect();
    assert_eq!(got, want);
}

pub async fn telemetry_metrics_per_device_bound_refuses_new_names_only(store: &dyn Store) {
    use AppendOutcome::{Duplicate, MetricsLimit, Stored};
    let outcomes = store
        .append_batch_bounded(
            vec![
                rec("d1", Some(1), 1_000, &[("a", num(1.0)), ("b", num(2.0))]),
                // Two names the device has; a third in the same batch is one too many.
                rec("d1", Some(2), 2_000, &[("a", num(3.0)), ("c", num(4.0))]),
                // Refused records leave no dedupe key: the same seq is stored once it fits.
                rec("d1", Some(2), 2_000, &[("a", num(3.0))]),
                // Another device has its own bound.
                rec("d2", Some(1), 1_000, &[("x", num(1.0)), ("y", num(1.0))]),
            ],
            2,
        )
        .await
        .expect("append");
    assert_eq!(outcomes, [Stored, MetricsLimit, Stored, Stored]);
    let later = store
        .append_batch_bounded(
            vec![
                rec("d1", Some(3), 3_000, &[("b", num(5.0))]),
                rec("d1", Some(4), 4_000, &[("z", num(5.0))]),
                rec("d1", Some(2), 2_000, &[("a", num(3.0))]),
            ],
            2,
        )
        .await
        .expect("append");
    assert_eq!(later, [Stored, MetricsLimit, Duplicate]);
    let stored: Vec<(String, u64)> = store
        .query(all_points("d1"))
        .await
        .expect("query")
        .into_iter()
        .map(|p| (p.metric, p.ts_ms))
        .collect();
    assert_eq!(
        stored,
        [
            ("a".to_owned(), 1_000),
            ("b".to_owned(), 1_000),
            ("a".to_owned(), 2_000),
            ("b".to_owned(), 3_000)
        ]
    );
    let latest = store.latest("d1").await.expect("latest");
    assert_eq!(latest.keys().collect::<Vec<_>>(), ["a", "b"]);
}
