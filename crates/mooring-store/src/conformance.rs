//! The behavioural contract of every backend, as async test cases plus [`conformance_tests!`](crate::conformance_tests).
//!
//! Each case gets a fresh, empty store and panics on a violation. A backend's test file runs
//! them all with one line:
//!
//! ```ignore
//! async fn fresh_store() -> (std::sync::Arc<dyn mooring_store::Store>, tempfile::TempDir) { ... }
//! mooring_store::conformance_tests!(fresh_store);
//! ```
//!
//! The factory is anything callable with no arguments that returns a future of
//! `(Arc<dyn Store>, guard)`; the guard (a temp dir, a throwaway database) lives until the case
//! ends. The calling crate needs `tokio` (with `macros` and `rt`) and `mooring-store` with the
//! `conformance` feature (this module exists only with it) as dev-dependencies.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{
    run_retention_pass, AppendOutcome, BrokerOp, BrokerState, BrokerStateWriter, CommandOutcome,
    CommandParentRecord, CommandRecord, CommandState, CreateOutcome, MetricValue, NewDevice, Point,
    ShadowRecord, Store, StoreError, StoredSession, TelemetryQuery, TelemetryRecord,
    TelemetryStore, TelemetryWriter, TelemetryWriterConfig, TokenRecord, TokenRole, TS_MS_MAX,
};

/// Expands to one `#[tokio::test]` per conformance case. See the [module docs](crate::conformance).
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@by_ref $factory;
            device_create_then_get_round_trips,
            device_duplicate_id_is_already_exists,
            device_find_by_cert_returns_the_owner,
            device_list_is_ordered_by_id_with_keyset_pagination,
            device_delete_removes_device_telemetry_latest_and_dedupe_keys,
            device_set_tags_replaces_all_and_missing_is_not_found,
            device_last_seen_keeps_the_maximum_and_skips_unknown_ids,
            token_create_find_list_delete,
            token_duplicate_id_or_secret_is_already_exists,
            telemetry_append_then_query_round_trips,
            telemetry_duplicate_seq_in_one_batch_is_stored_once,
            telemetry_duplicate_seq_across_batches_is_stored_once,
            telemetry_seq_is_per_device_and_none_is_always_stored,
            telemetry_query_filters_and_orders,
            telemetry_latest_is_newest_point_per_metric,
            telemetry_booleans_round_trip_distinct_from_numbers,
            telemetry_retention_deletes_only_old_rows_in_chunks,
            telemetry_retention_prunes_dedupe_keys_with_points,
            telemetry_invalid_records_are_refused_whole,
            telemetry_empty_batch_is_ok,
            command_create_get_and_compare_and_set_update,
            command_idempotency_key_returns_the_existing_command,
            command_for_a_missing_device_is_not_found_and_nothing_is_stored,
            command_list_is_newest_first_with_state_filter_and_cursor,
            command_pending_and_due_queries_follow_state_and_times,
            command_fleet_parent_counts_children_per_state,
            command_and_shadow_are_deleted_with_their_device,
            shadow_save_is_compare_and_set_on_version,
            broker_state_ops_apply_in_order_and_load_back,
            broker_state_delete_session_takes_its_messages,
        );
        $crate::conformance_tests!(@by_arc $factory;
            writer_group_commits_concurrent_appends_and_reports_duplicates,
            writer_drains_queue_and_stops_when_handles_are_dropped,
            writer_refuses_invalid_record_without_failing_others,
            retention_pass_deletes_everything_old_in_chunks,
            broker_writer_applies_submissions_in_order_and_answers_tickets,
        );
    };
    (@by_ref $factory:expr; $($case:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $case() {
            let (store, _guard) = ($factory)().await;
            $crate::conformance::$case(&*store).await;
        }
    )*};
    (@by_arc $factory:expr; $($case:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $case() {
            let (store, _guard) = ($factory)().await;
            $crate::conformance::$case(store).await;
        }
    )*};
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn new_device(id: &str) -> NewDevice {
    NewDevice {
        id: id.to_owned(),
        tags: tags(&[("site", "north")]),
        created_at_ms: 1_700_000_000_000,
        cert_sha256: format!("sha-{id}"),
        cert_serial: format!("serial-{id}"),
        cert_not_after_ms: 1_800_000_000_000,
    }
}

fn rec(
    device: &str,
    seq: Option<u64>,
    ts_ms: u64,
    points: &[(&str, MetricValue)],
) -> TelemetryRecord {
    TelemetryRecord {
        device_id: device.to_owned(),
        seq,
        ts_ms,
        points: points.iter().map(|(m, v)| ((*m).to_owned(), *v)).collect(),
    }
}

fn num(n: f64) -> MetricValue {
    MetricValue::Number(n)
}

fn all_points(device: &str) -> TelemetryQuery {
    TelemetryQuery {
        device_id: device.to_owned(),
        metric: None,
        from_ms: None,
        to_ms: None,
        limit: 10_000,
    }
}

async fn count_points(store: &dyn Store, device: &str) -> usize {
    store
        .query(all_points(device))
        .await
        .expect("query all points")
        .len()
}

async fn append(store: &dyn Store, batch: Vec<TelemetryRecord>) -> Vec<AppendOutcome> {
    let len = batch.len();
    let outcomes = store.append_batch(batch).await.expect("append_batch");
    assert_eq!(outcomes.len(), len, "one outcome per record");
    outcomes
}

fn token(id: &str, role: TokenRole) -> TokenRecord {
    TokenRecord {
        id: id.to_owned(),
        name: format!("token {id}"),
        role,
        token_sha256: format!("hash-{id}"),
        created_at_ms: 1_700_000_000_000,
    }
}

// ---------------------------------------------------------------------------------- devices

pub async fn device_create_then_get_round_trips(store: &dyn Store) {
    let created = store.create_device(new_device("d1")).await.expect("create");
    assert_eq!(created, new_device("d1").into_record());
    assert_eq!(created.last_seen_ms, None);
    let got = store.get_device("d1").await.expect("get");
    assert_eq!(got, Some(created));
    assert_eq!(store.get_device("nope").await.expect("get missing"), None);
}

pub async fn device_duplicate_id_is_already_exists(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("create");
    let mut again = new_device("d1");
    again.cert_sha256 = "other".into();
    let err = store
        .create_device(again)
        .await
        .expect_err("duplicate id must fail");
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    assert_eq!(err.kind(), "already_exists");
    let kept = store.get_device("d1").await.expect("get").expect("present");
    assert_eq!(kept.cert_sha256, "sha-d1", "the first registration is kept");
}

pub async fn device_find_by_cert_returns_the_owner(store: &dyn Store) {
    store
        .create_device(new_device("d1"))
        .await
        .expect("create d1");
    store
        .create_device(new_device("d2"))
        .await
        .expect("create d2");
    let found = store
        .find_device_by_cert("sha-d2")
        .await
        .expect("find")
        .expect("present");
    assert_eq!(found.id, "d2");
    assert_eq!(
        store.find_device_by_cert("sha-x").await.expect("find"),
        None
    );
}

pub async fn device_list_is_ordered_by_id_with_keyset_pagination(store: &dyn Store) {
    // Byte order: uppercase sorts before lowercase, "d10" before "d2".
    for id in ["d2", "a", "d10", "B", "c.1", "c-1"] {
        store.create_device(new_device(id)).await.expect("create");
    }
    let expected = ["B", "a", "c-1", "c.1", "d10", "d2"];
    let all: Vec<String> = store
        .list_devices(100, None)
        .await
        .expect("list")
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(all, expected);

    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let page = store.list_devices(4, after.as_deref()).await.expect("page");
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        paged.extend(page.into_iter().map(|d| d.id));
    }
    assert_eq!(paged, expected);
    assert!(store
        .list_devices(0, None)
        .await
        .expect("list 0")
        .is_empty());
    assert!(store
        .list_devices(10, Some("zzz"))
        .await
        .expect("after last")
        .is_empty());
}

pub async fn device_delete_removes_device_telemetry_latest_and_dedupe_keys(store: &dyn Store) {
    store
        .create_device(new_device("d1"))
        .await
        .expect("create d1");
    store
        .create_device(new_device("d2"))
        .await
        .expect("create d2");
    let batch = (0..50)
        .flat_map(|i| {
            [
                rec(
                    "d1",
                    Some(i),
                    1_000 + i,
                    &[("t", num(1.0)), ("u", num(2.0))],
                ),
                rec("d2", Some(i), 1_000 + i, &[("t", num(3.0))]),
            ]
        })
        .collect();
    append(store, batch).await;

    assert!(store.delete_device("d1").await.expect("delete"));
    assert_eq!(store.get_device("d1").await.expect("get"), None);
    assert_eq!(count_points(store, "d1").await, 0);
    assert!(store.latest("d1").await.expect("latest").is_empty());
    assert!(!store.delete_device("d1").await.expect("delete again"));

    // Other devices are untouched.
    assert_eq!(count_points(store, "d2").await, 50);
    assert_eq!(store.latest("d2").await.expect("latest d2").len(), 1);

    // A device re-registered under the same id starts afresh: its old seqs are not duplicates.
    store
        .create_device(new_device("d1"))
        .await
        .expect("re-create");
    let outcomes = append(store, vec![rec("d1", Some(0), 5_000, &[("t", num(9.0))])]).await;
    assert_eq!(outcomes, [AppendOutcome::Stored]);
}

pub async fn device_set_tags_replaces_all_and_missing_is_not_found(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("create");
    let new_tags = tags(&[("fw", "1.2"), ("room", "7")]);
    store
        .set_tags("d1", new_tags.clone())
        .await
        .expect("set tags");
    let got = store.get_device("d1").await.expect("get").expect("present");
    assert_eq!(got.tags, new_tags, "tags are replaced, not merged");
    store
        .set_tags("d1", BTreeMap::new())
        .await
        .expect("clear tags");
    let got = store.get_device("d1").await.expect("get").expect("present");
    assert!(got.tags.is_empty());

    let err = store
        .set_tags("nope", new_tags)
        .await
        .expect_err("missing device");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    assert_eq!(err.kind(), "not_found");
}

pub async fn device_last_seen_keeps_the_maximum_and_skips_unknown_ids(store: &dyn Store) {
    store
        .create_device(new_device("d1"))
        .await
        .expect("create d1");
    store
        .create_device(new_device("d2"))
        .await
        .expect("create d2");
    let last_seen = |id: &'static str| async move {
        store
            .get_device(id)
            .await
            .expect("get")
            .expect("present")
            .last_seen_ms
    };

    store
        .record_last_seen(&[("d1".into(), 500), ("ghost".into(), 9_000)])
        .await
        .expect("record");
    assert_eq!(last_seen("d1").await, Some(500));
    assert_eq!(last_seen("d2").await, None);
    assert_eq!(store.get_device("ghost").await.expect("get"), None);

    // Older values never move it back; within one batch the maximum wins.
    store
        .record_last_seen(&[("d1".into(), 400), ("d2".into(), 700), ("d2".into(), 600)])
        .await
        .expect("record older");
    assert_eq!(last_seen("d1").await, Some(500));
    assert_eq!(last_seen("d2").await, Some(700));

    store
        .record_last_seen(&[("d1".into(), 900)])
        .await
        .expect("record newer");
    assert_eq!(last_seen("d1").await, Some(900));
    store.record_last_seen(&[]).await.expect("empty batch");
}

// ----------------------------------------------------------------------------------- tokens

pub async fn token_create_find_list_delete(store: &dyn Store) {
    assert!(store.list_tokens().await.expect("list").is_empty());
    store
        .create_token(token("t2", TokenRole::Service))
        .await
        .expect("create t2");
    store
        .create_token(token("t1", TokenRole::Admin))
        .await
        .expect("create t1");

    let found = store.find_token("hash-t1").await.expect("find");
    assert_eq!(found, Some(token("t1", TokenRole::Admin)));
    let found = store.find_token("hash-t2").await.expect("find");
    assert_eq!(found.map(|t| t.role), Some(TokenRole::Service));
    assert_eq!(store.find_token("hash-x").await.expect("find"), None);

    let ids: Vec<String> = store
        .list_tokens()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, ["t1", "t2"]);

    assert!(store.delete_token("t1").await.expect("delete"));
    assert!(!store.delete_token("t1").await.expect("delete again"));
    assert_eq!(store.find_token("hash-t1").await.expect("find"), None);
    assert_eq!(store.list_tokens().await.expect("list").len(), 1);
}

pub async fn token_duplicate_id_or_secret_is_already_exists(store: &dyn Store) {
    store
        .create_token(token("t1", TokenRole::Admin))
        .await
        .expect("create");
    let mut same_id = token("t1", TokenRole::Admin);
    same_id.token_sha256 = "other".into();
    let err = store.create_token(same_id).await.expect_err("same id");
    assert_eq!(err.kind(), "already_exists", "{err:?}");
    let mut same_secret = token("t9", TokenRole::Service);
    same_secret.token_sha256 = "hash-t1".into();
    let err = store
        .create_token(same_secret)
        .await
        .expect_err("same secret hash");
    assert_eq!(err.kind(), "already_exists", "{err:?}");
    assert_eq!(store.list_tokens().await.expect("list").len(), 1);
}

// -------------------------------------------------------------------------------- telemetry

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
            device_id: "d1".into(),
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

// ---------------------------------------------------------------------- writer + retention

pub async fn writer_group_commits_concurrent_appends_and_reports_duplicates(store: Arc<dyn Store>) {
    const APPENDS: u64 = 200;
    const DUPLICATES: u64 = 20;
    let telemetry: Arc<dyn TelemetryStore> = store.clone();
    let (writer, task) = TelemetryWriter::spawn(
        telemetry,
        TelemetryWriterConfig {
            queue_len_max: 1024,
            batch_len_max: 64,
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

// --------------------------------------------------------------------------------- commands

fn command(id: &str, device: &str, created_at_ms: u64) -> CommandRecord {
    CommandRecord {
        id: id.to_owned(),
        device_id: device.to_owned(),
        name: "reboot".to_owned(),
        params: serde_json::json!({"delay_secs": 5}),
        state: CommandState::Queued,
        attempts: 0,
        max_attempts: 5,
        created_at_ms,
        expires_at_ms: created_at_ms + 60_000,
        next_attempt_at_ms: created_at_ms,
        parent_id: None,
        idempotency_key: None,
        history: vec![(CommandState::Queued, created_at_ms)],
        result: None,
        result_timeout_ms: 0,
    }
}

async fn create_one(store: &dyn Store, c: CommandRecord) -> CreateOutcome {
    let mut out = store
        .create_commands(None, vec![c])
        .await
        .expect("create_commands");
    assert_eq!(out.len(), 1);
    out.remove(0)
}

pub async fn command_create_get_and_compare_and_set_update(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    let c = command("c1", "d1", 1000);
    assert_eq!(
        create_one(store, c.clone()).await,
        CreateOutcome::Created(c.clone())
    );
    assert_eq!(store.get_command("c1").await.expect("get"), Some(c.clone()));
    assert_eq!(store.get_command("nope").await.expect("get"), None);

    let mut done = c.clone();
    done.state = CommandState::Succeeded;
    done.attempts = 1;
    done.history.push((CommandState::Succeeded, 2000));
    done.result = Some(CommandOutcome {
        succeeded: true,
        output: serde_json::json!({"bundle": {"log": ["a", "b"]}}),
    });
    // Wrong expected state: nothing changes.
    assert!(!store
        .update_command(done.clone(), CommandState::Delivered)
        .await
        .expect("update"));
    assert_eq!(store.get_command("c1").await.expect("get"), Some(c));
    assert!(store
        .update_command(done.clone(), CommandState::Queued)
        .await
        .expect("update"));
    assert_eq!(store.get_command("c1").await.expect("get"), Some(done));
    // A duplicate command id is refused.
    let err = store
        .create_commands(None, vec![command("c1", "d1", 3000)])
        .await
        .expect_err("duplicate id");
    assert_eq!(err.kind(), "already_exists");
}

pub async fn command_idempotency_key_returns_the_existing_command(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    store.create_device(new_device("d2")).await.expect("device");
    let mut a = command("c1", "d1", 1000);
    a.idempotency_key = Some("k".into());
    let mut b = command("c2", "d1", 2000);
    b.idempotency_key = Some("k".into());
    let mut other_device = command("c3", "d2", 2000);
    other_device.idempotency_key = Some("k".into());
    assert!(matches!(
        create_one(store, a.clone()).await,
        CreateOutcome::Created(_)
    ));
    assert_eq!(create_one(store, b).await, CreateOutcome::Existing(a));
    assert!(store.get_command("c2").await.expect("get").is_none());
    assert!(matches!(
        create_one(store, other_device).await,
        CreateOutcome::Created(_)
    ));
}

pub async fn command_for_a_missing_device_is_not_found_and_nothing_is_stored(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    let parent = CommandParentRecord {
        id: "f1".into(),
        selector: "d1,ghost".into(),
        name: "reboot".into(),
        params: serde_json::Value::Null,
        created_at_ms: 1000,
        expires_at_ms: 2000,
        total: 2,
    };
    let err = store
        .create_commands(
            Some(parent),
            vec![command("c1", "d1", 1000), command("c2", "ghost", 1000)],
        )
        .await
        .expect_err("missing device");
    assert_eq!(err.kind(), "not_found");
    assert!(store.get_command("c1").await.expect("get").is_none());
    assert!(store.get_command_parent("f1").await.expect("get").is_none());
}

pub async fn command_list_is_newest_first_with_state_filter_and_cursor(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    store.create_device(new_device("d2")).await.expect("device");
    let batch: Vec<CommandRecord> = (0..5)
        .map(|i| command(&format!("c{i}"), "d1", 1000 + i))
        .chain([command("x", "d2", 1000)])
        .collect();
    store.create_commands(None, batch).await.expect("create");
    let mut c3 = store.get_command("c3").await.expect("get").expect("c3");
    c3.state = CommandState::Canceled;
    assert!(store
        .update_command(c3, CommandState::Queued)
        .await
        .expect("update"));
    let ids = |v: Vec<CommandRecord>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
    let page = store
        .list_commands("d1", None, 2, None)
        .await
        .expect("list");
    assert_eq!(ids(page), ["c4", "c3"]);
    let page = store
        .list_commands("d1", None, 10, Some("c3"))
        .await
        .expect("list");
    assert_eq!(ids(page), ["c2", "c1", "c0"]);
    let page = store
        .list_commands("d1", Some(CommandState::Canceled), 10, None)
        .await
        .expect("list");
    assert_eq!(ids(page), ["c3"]);
    assert!(
        store
            .list_commands("d1", None, 10, Some("x"))
            .await
            .is_err(),
        "cursor of another device"
    );
}

pub async fn command_pending_and_due_queries_follow_state_and_times(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    let batch: Vec<CommandRecord> = (0..4)
        .map(|i| command(&format!("c{i}"), "d1", 1000 + i))
        .collect();
    store.create_commands(None, batch).await.expect("create");
    let set = |id: &str, state: CommandState, next_ms: u64, expires_ms: u64| {
        let id = id.to_owned();
        async move {
            let mut c = store.get_command(&id).await.expect("get").expect("exists");
            let from = c.state;
            c.state = state;
            c.next_attempt_at_ms = next_ms;
            c.expires_at_ms = expires_ms;
            assert!(store.update_command(c, from).await.expect("update"));
        }
    };
    // c0 queued (expires 61000); c1 delivered, retry due at 5000; c2 delivered, retry at 9000;
    // c3 acknowledged.
    set("c1", CommandState::Delivered, 5000, 61_001).await;
    set("c2", CommandState::Delivered, 9000, 61_002).await;
    set("c3", CommandState::Acknowledged, 0, 0).await;
    let ids = |v: Vec<CommandRecord>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
    let p = store
        .pending_commands("d1", 6000, false, 10)
        .await
        .expect("pending");
    assert_eq!(ids(p), ["c0", "c1"]);
    let p = store
        .pending_commands("d1", 6000, true, 10)
        .await
        .expect("pending");
    assert_eq!(ids(p), ["c0", "c1", "c2", "c3"]);
    let p = store
        .pending_commands("d1", 6000, true, 1)
        .await
        .expect("pending");
    assert_eq!(ids(p), ["c0"]);
    assert_eq!(
        ids(store.due_commands(4000, 10).await.expect("due")),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(store.due_commands(9000, 10).await.expect("due")),
        ["c1", "c2"]
    );
    // Expiry makes queued ones due too; the acknowledged one never is.
    assert_eq!(
        ids(store.due_commands(100_000, 10).await.expect("due")),
        ["c0", "c1", "c2"]
    );
    assert_eq!(store.due_commands(100_000, 2).await.expect("due").len(), 2);
    // An acknowledged command with a result timeout is due once its deadline (kept in
    // next_attempt_at_ms) passes; the timeout is stored with it.
    let mut c4 = command("c4", "d1", 1000);
    c4.result_timeout_ms = 30_000;
    store.create_commands(None, vec![c4]).await.expect("create");
    set("c4", CommandState::Acknowledged, 50_000, 61_004).await;
    let c4 = store.get_command("c4").await.expect("get").expect("c4");
    assert_eq!(c4.result_timeout_ms, 30_000);
    assert!(!ids(store.due_commands(49_999, 10).await.expect("due")).contains(&"c4".to_owned()));
    assert_eq!(
        ids(store.due_commands(100_000, 10).await.expect("due")),
        ["c0", "c1", "c2", "c4"]
    );
}

pub async fn command_fleet_parent_counts_children_per_state(store: &dyn Store) {
    for i in 0..3 {
        store
            .create_device(new_device(&format!("d{i}")))
            .await
            .expect("device");
    }
    let parent = CommandParentRecord {
        id: "f1".into(),
        selector: "tag:site=north".into(),
        name: "reboot".into(),
        params: serde_json::json!({"a": 1}),
        created_at_ms: 1000,
        expires_at_ms: 61_000,
        total: 3,
    };
    let children: Vec<CommandRecord> = (0..3)
        .map(|i| {
            let mut c = command(&format!("c{i}"), &format!("d{i}"), 1000);
            c.parent_id = Some("f1".into());
            c
        })
        .collect();
    let out = store
        .create_commands(Some(parent.clone()), children)
        .await
        .expect("create");
    assert_eq!(out.len(), 3);
    assert_eq!(
        store.get_command_parent("f1").await.expect("get"),
        Some(parent)
    );
    let mut c0 = store.get_command("c0").await.expect("get").expect("c0");
    c0.state = CommandState::Expired;
    assert!(store
        .update_command(c0, CommandState::Queued)
        .await
        .expect("update"));
    let counts = store.count_children("f1").await.expect("count");
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [(CommandState::Queued, 2), (CommandState::Expired, 1)]
    );
    assert!(store
        .count_children("nope")
        .await
        .expect("count")
        .is_empty());
}

pub async fn command_and_shadow_are_deleted_with_their_device(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    create_one(store, command("c1", "d1", 1000)).await;
    let shadow = ShadowRecord {
        device_id: "d1".into(),
        version: 1,
        ..ShadowRecord::default()
    };
    assert!(store.save_shadow(shadow, 0).await.expect("save"));
    assert!(store.delete_device("d1").await.expect("delete"));
    assert!(store.get_command("c1").await.expect("get").is_none());
    assert!(store.get_shadow("d1").await.expect("get").is_none());
}

pub async fn shadow_save_is_compare_and_set_on_version(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    store.create_device(new_device("d2")).await.expect("device");
    assert!(store.get_shadow("d1").await.expect("get").is_none());
    let obj = |v: serde_json::Value| match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let v1 = ShadowRecord {
        device_id: "d1".into(),
        desired: obj(serde_json::json!({"led": "on"})),
        reported: obj(serde_json::json!({"version": "1.4.0"})),
        version: 1,
        updated_at_ms: 1000,
    };
    assert!(store.save_shadow(v1.clone(), 0).await.expect("insert"));
    assert!(!store
        .save_shadow(v1.clone(), 0)
        .await
        .expect("second insert"));
    assert_eq!(store.get_shadow("d1").await.expect("get"), Some(v1.clone()));
    let mut v2 = v1.clone();
    v2.version = 2;
    v2.desired = obj(serde_json::json!({"led": "off"}));
    assert!(!store.save_shadow(v2.clone(), 5).await.expect("stale"));
    assert!(store.save_shadow(v2.clone(), 1).await.expect("update"));
    assert_eq!(store.get_shadow("d1").await.expect("get"), Some(v2.clone()));
    let missing = ShadowRecord {
        device_id: "ghost".into(),
        version: 1,
        ..ShadowRecord::default()
    };
    assert_eq!(
        store
            .save_shadow(missing, 0)
            .await
            .expect_err("no device")
            .kind(),
        "not_found"
    );
    let d2 = ShadowRecord {
        device_id: "d2".into(),
        version: 1,
        ..ShadowRecord::default()
    };
    assert!(store.save_shadow(d2.clone(), 0).await.expect("insert"));
    let got = store
        .get_shadows(&["d2".into(), "ghost".into(), "d1".into()])
        .await
        .expect("get_shadows");
    assert_eq!(got.len(), 2);
    let listed = store.list_shadows(1, None).await.expect("list");
    assert_eq!(listed, vec![v2]);
    let listed = store.list_shadows(10, Some("d1")).await.expect("list");
    assert_eq!(listed, vec![d2]);
}

fn put_message(session: &str, seq: u64, value: &[u8]) -> BrokerOp {
    BrokerOp::PutMessage {
        session: session.into(),
        seq,
        value: value.to_vec(),
    }
}

pub async fn broker_state_ops_apply_in_order_and_load_back(store: &dyn Store) {
    assert_eq!(
        store.load_broker_state().await.expect("load empty"),
        BrokerState::default()
    );
    store
        .apply_broker_ops(vec![
            BrokerOp::PutRetained {
                topic: "b/t".into(),
                value: b"old".to_vec(),
            },
            BrokerOp::PutRetained {
                topic: "b/t".into(),
                value: b"new".to_vec(),
            },
            BrokerOp::PutRetained {
                topic: "a/t".into(),
                value: vec![0, 255, 1],
            },
            BrokerOp::PutRetained {
                topic: "gone".into(),
                value: b"x".to_vec(),
            },
            BrokerOp::DeleteRetained {
                topic: "gone".into(),
            },
            BrokerOp::DeleteRetained {
                topic: "never-there".into(),
            },
            BrokerOp::PutSession {
                key: "s:pipeline".into(),
                value: b"v1".to_vec(),
            },
            put_message("s:pipeline", 10, b"m10"),
            put_message("s:pipeline", 2, b"m2"),
            put_message("s:pipeline", 7, b"m7"),
            BrokerOp::DeleteMessage {
                session: "s:pipeline".into(),
                seq: 7,
            },
            put_message("s:pipeline", 2, b"m2-sent"),
            BrokerOp::PutSession {
                key: "s:pipeline".into(),
                value: b"v2".to_vec(),
            },
            BrokerOp::PutSession {
                key: "d:lock-1".into(),
                value: b"d".to_vec(),
            },
            // A message whose session is not stored is never loaded.
            put_message("s:orphan", 1, b"lost"),
        ])
        .await
        .expect("apply");
    let state = store.load_broker_state().await.expect("load");
    assert_eq!(
        state.retained,
        vec![
            ("a/t".to_owned(), vec![0, 255, 1]),
            ("b/t".to_owned(), b"new".to_vec())
        ]
    );
    assert_eq!(
        state.sessions,
        vec![
            StoredSession {
                key: "d:lock-1".into(),
                value: b"d".to_vec(),
                messages: vec![],
            },
            StoredSession {
                key: "s:pipeline".into(),
                value: b"v2".to_vec(),
                messages: vec![(2, b"m2-sent".to_vec()), (10, b"m10".to_vec())],
            },
        ]
    );
    store
        .apply_broker_ops(vec![BrokerOp::PutSession {
            key: "s:orphan".into(),
            value: b"late".to_vec(),
        }])
        .await
        .expect("apply");
    let state = store.load_broker_state().await.expect("load");
    let orphan = state.sessions.iter().find(|s| s.key == "s:orphan");
    assert_eq!(
        orphan.map(|s| s.messages.len()),
        Some(0),
        "orphaned messages are dropped at load"
    );
    assert!(store.apply_broker_ops(Vec::new()).await.is_ok());
}

pub async fn broker_state_delete_session_takes_its_messages(store: &dyn Store) {
    store
        .apply_broker_ops(vec![
            BrokerOp::PutSession {
                key: "s:a".into(),
                value: b"a".to_vec(),
            },
            put_message("s:a", 1, b"1"),
            put_message("s:a", 2, b"2"),
            BrokerOp::PutSession {
                key: "s:b".into(),
                value: b"b".to_vec(),
            },
            put_message("s:b", 1, b"b1"),
        ])
        .await
        .expect("apply");
    store
        .apply_broker_ops(vec![
            BrokerOp::DeleteSession { key: "s:a".into() },
            // A clean start under the same key: a new session with nothing queued.
            BrokerOp::PutSession {
                key: "s:a".into(),
                value: b"a2".to_vec(),
            },
        ])
        .await
        .expect("apply");
    let state = store.load_broker_state().await.expect("load");
    assert_eq!(state.sessions.len(), 2);
    assert_eq!(state.sessions[0].value, b"a2".to_vec());
    assert!(state.sessions[0].messages.is_empty());
    assert_eq!(state.sessions[1].messages, vec![(1, b"b1".to_vec())]);
}

pub async fn broker_writer_applies_submissions_in_order_and_answers_tickets(store: Arc<dyn Store>) {
    let (writer, task) = BrokerStateWriter::spawn(store.clone());
    writer.submit_detached(vec![BrokerOp::PutSession {
        key: "s:w".into(),
        value: b"s".to_vec(),
    }]);
    let mut tickets = Vec::new();
    for seq in 0..200u64 {
        tickets.push(writer.submit(vec![put_message("s:w", seq, b"m")]));
        if seq % 2 == 0 {
            writer.submit_detached(vec![BrokerOp::DeleteMessage {
                session: "s:w".into(),
                seq,
            }]);
        }
    }
    for t in tickets {
        t.await.expect("answered").expect("durable");
    }
    writer.flush().await.expect("flush");
    let state = store.load_broker_state().await.expect("load");
    let seqs: Vec<u64> = state.sessions[0].messages.iter().map(|m| m.0).collect();
    assert_eq!(seqs, (0..200).filter(|s| s % 2 == 1).collect::<Vec<_>>());
    let stats = writer.stats();
    assert_eq!(stats.queued_ops, 0);
    assert_eq!(stats.ops, 301);
    assert!(stats.batches >= 1 && stats.batches <= 202, "{stats:?}");
    drop(writer);
    task.await.expect("writer stops once every handle is gone");
}
