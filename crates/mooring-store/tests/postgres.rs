//! The conformance suite and PostgreSQL-specific behaviour (migrations under
//! concurrent start, schema too new, unreachable server), each test on a database of its own.
//!
//! Needs PostgreSQL at `MOORING_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`, as in CI): every test creates a throwaway database
//! `mooring_test_<pid>_<nanos>_<n>` from there and drops it (`WITH (FORCE)`) when it ends. If the
//! server is unreachable the tests fail, saying so: they are never skipped.
#![cfg(feature = "postgres")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mooring_store::{
    AppendOutcome, AttachOutcome, BrokerOp, BrokerStateStore, CommandRecord, CommandState,
    CommandStore, CreateOutcome, DeviceStore, GatewayStore, MetricValue, PgStore, ShadowRecord,
    ShadowStore, Store, StoreError, TelemetryQuery, TelemetryRecord, TelemetryStore,
};
use tokio_postgres::NoTls;

const ADMIN_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

fn admin_url() -> String {
    std::env::var("MOORING_TEST_POSTGRES_URL").unwrap_or_else(|_| ADMIN_URL_DEFAULT.to_owned())
}

/// Runs `sql` on the admin database on a connection of its own.
async fn admin_execute(admin_url: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(admin_url, NoTls)
        .await
        .unwrap_or_else(|e| {
            let cause = std::error::Error::source(&e).map(|s| format!(": {s}"));
            panic!(
                "PostgreSQL is unreachable at {admin_url} ({e}{}): the postgres backend tests need \
                 a running server (CI has one at 127.0.0.1:5432, trust auth, user postgres, \
                 database test); set MOORING_TEST_POSTGRES_URL to use another",
                cause.unwrap_or_default()
            )
        });
    let driver = tokio::spawn(connection);
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    // The connection ends once the client is gone.
    let _ = driver.await;
}

/// A throwaway database, dropped with everything in it when this guard is.
struct TestDb {
    admin_url: String,
    name: String,
}

impl TestDb {
    async fn create() -> TestDb {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(
            "mooring_test_{}_{nanos}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let admin_url = admin_url();
        // DDL takes no parameters; the name is ours (ASCII letters, digits and underscores).
        admin_execute(&admin_url, &format!("CREATE DATABASE \"{name}\"")).await;
        TestDb { admin_url, name }
    }

    fn config(&self) -> tokio_postgres::Config {
        let mut config: tokio_postgres::Config =
            self.admin_url.parse().expect("MOORING_TEST_POSTGRES_URL");
        config.dbname(&self.name);
        config
    }

    async fn store(&self) -> PgStore {
        PgStore::connect_with(self.config())
            .await
            .expect("connect to the test database and migrate")
    }

    /// Runs `sql` in this database.
    async fn execute(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        let (client, driver) = self.connect().await;
        let rows = client.query(sql, &[]).await.expect(sql);
        drop(client);
        let _ = driver.await;
        rows
    }

    /// A connection of its own to this database; it ends once the client is dropped (await the
    /// handle then).
    async fn connect(&self) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
        let (client, connection) = self.config().connect(NoTls).await.expect("connect");
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        (client, driver)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread with a
        // runtime of its own drops the database (FORCE ends the store's pooled connections).
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(admin_execute(&admin_url, &sql));
        })
        .join();
        if dropped.is_err() && !std::thread::panicking() {
            panic!("could not drop test database {}", self.name);
        }
    }
}

async fn fresh_store() -> (Arc<dyn Store>, TestDb) {
    let db = TestDb::create().await;
    let store = db.store().await;
    (Arc::new(store), db)
}

mooring_store::conformance_tests!(fresh_store);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servers_starting_together_migrate_once() {
    let db = TestDb::create().await;
    let config = db.config();
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move { PgStore::connect_with(config).await })
        })
        .collect();
    for start in starts {
        start
            .await
            .expect("connect task")
            .expect("connect and migrate");
    }
    let rows = db
        .execute("SELECT version FROM schema_migrations ORDER BY version")
        .await;
    let versions: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let expected: Vec<i64> = (1..=mooring_store::postgres::schema_version()).collect();
    assert_eq!(versions, expected, "every migration applied exactly once");
    // And a later start finds nothing to do.
    let store = db.store().await;
    assert!(store.list_devices(10, None).await.expect("list").is_empty());
}

#[tokio::test]
async fn refuses_a_database_from_a_newer_schema() {
    let db = TestDb::create().await;
    drop(db.store().await);
    db.execute("INSERT INTO schema_migrations (version, applied_at_ms) VALUES (999, 0)")
        .await;
    let err = PgStore::connect_with(db.config())
        .await
        .expect_err("newer schema must be refused");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 999, .. }),
        "{err:?}"
    );
    assert_eq!(err.kind(), "schema_too_new");
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable() {
    // Port 1 on loopback: nothing listens there.
    let err = PgStore::connect("postgres://postgres@127.0.0.1:1/test")
        .await
        .expect_err("nothing listens on port 1");
    assert_eq!(err.kind(), "unavailable", "{err:?}");
}

#[tokio::test]
async fn a_malformed_url_is_invalid_input() {
    let err = PgStore::connect("postgres://[::1")
        .await
        .expect_err("malformed url");
    assert_eq!(err.kind(), "invalid_input", "{err:?}");
}

// ---- Telemetry on PostgreSQL: day partitions, retention by dropping them, the metric bound
// ---- across servers. Days are relative to today: partitions are made for days near it.

const DAY_MS: u64 = 86_400_000;

fn today() -> u64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    now_ms / DAY_MS
}

fn rec(device: &str, seq: Option<u64>, ts_ms: u64, points: &[(&str, f64)]) -> TelemetryRecord {
    TelemetryRecord {
        device_id: mooring_proto::DeviceId::parse(device).expect("test id"),
        seq,
        ts_ms,
        points: points
            .iter()
            .map(|(m, v)| ((*m).to_owned(), MetricValue::Number(*v)))
            .collect(),
    }
}

fn all_points(device: &str) -> TelemetryQuery {
    TelemetryQuery {
        device_id: mooring_proto::DeviceId::parse(device).expect("test id"),
        metric: None,
        from_ms: None,
        to_ms: None,
        limit: 100_000,
    }
}

/// The partitions of `telemetry_points`, by name.
async fn partitions(db: &TestDb) -> Vec<String> {
    db.execute(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'telemetry_points'::regclass ORDER BY 1",
    )
    .await
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// How many points each partition holds (empty ones absent).
async fn points_per_partition(db: &TestDb) -> BTreeMap<String, i64> {
    db.execute("SELECT tableoid::regclass::text, count(*) FROM telemetry_points GROUP BY 1")
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn partition(day: u64) -> String {
    format!("telemetry_points_d{day}")
}

#[tokio::test]
async fn retention_drops_whole_day_partitions_and_deletes_rows_only_where_the_cutoff_falls() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let days = [today() - 10, today() - 9, today() - 8];
    // Ten records (two metrics, a seq each) per day, one a minute.
    let batch: Vec<TelemetryRecord> = days
        .iter()
        .enumerate()
        .flat_map(|(d, day)| {
            (0..10u64).map(move |i| {
                rec(
                    "d1",
                    Some(u64::try_from(d).expect("small") * 100 + i),
                    day * DAY_MS + i * 60_000,
                    &[("a", 1.0), ("b", 2.0)],
                )
            })
        })
        .collect();
    store.append_batch(batch).await.expect("append");
    let names = partitions(&db).await;
    for day in days {
        assert!(names.contains(&partition(day)), "{names:?}");
    }
    assert!(
        names.contains(&partition(today() + 1)),
        "tomorrow's is made ahead: {names:?}"
    );
    assert_eq!(
        points_per_partition(&db)
            .await
            .get("telemetry_points_default"),
        None
    );

    // The cutoff falls inside the third day: the first two go whole, one per call, each call
    // returning what its partition held; then rows in chunks of at most max_rows.
    let cutoff = days[2] * DAY_MS + 5 * 60_000;
    let mut calls = Vec::new();
    loop {
        let deleted = store.delete_older_than(cutoff, 4).await.expect("retention");
        if deleted == 0 {
            break;
        }
        calls.push(deleted);
        assert!(calls.len() < 100, "retention must terminate");
    }
    assert_eq!(calls[..2], [20, 20], "{calls:?}");
    assert!(calls[2..].iter().all(|n| *n <= 4), "{calls:?}");
    // Ten points of the third day, and the 25 dedupe keys older than the cutoff.
    assert_eq!(calls[2..].iter().sum::<usize>(), 10 + 25, "{calls:?}");
    let names = partitions(&db).await;
    assert!(!names.contains(&partition(days[0])), "{names:?}");
    assert!(!names.contains(&partition(days[1])), "{names:?}");
    assert!(names.contains(&partition(days[2])), "{names:?}");
    let left: Vec<u64> = store
        .query(all_points("d1"))
        .await
        .expect("query")
        .iter()
        .map(|p| p.ts_ms)
        .collect();
    let want: Vec<u64> = (5..10u64)
        .flat_map(|i| [days[2] * DAY_MS + i * 60_000; 2])
        .collect();
    assert_eq!(left, want);
    // Dedupe keys went with their points, dropped partition or not; later ones still dedupe.
    let outcomes = store
        .append_batch(vec![
            rec("d1", Some(3), days[0] * DAY_MS + 3 * 60_000, &[("a", 1.0)]),
            rec(
                "d1",
                Some(202),
                days[2] * DAY_MS + 2 * 60_000,
                &[("a", 1.0)],
            ),
            rec(
                "d1",
                Some(207),
                days[2] * DAY_MS + 7 * 60_000,
                &[("a", 1.0)],
            ),
        ])
        .await
        .expect("append again");
    assert_eq!(
        outcomes,
        [
            AppendOutcome::Stored,
            AppendOutcome::Stored,
            AppendOutcome::Duplicate
        ]
    );
    // The last known values survive retention.
    let latest = store.latest("d1").await.expect("latest");
    assert_eq!(
        latest.get("b"),
        Some(&(days[2] * DAY_MS + 9 * 60_000, MetricValue::Number(2.0)))
    );
}

#[tokio::test]
async fn a_partition_that_cannot_be_locked_in_time_is_emptied_in_chunks_instead() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let day = today() - 5;
    let batch = (0..6u64)
        .map(|i| rec("d1", None, day * DAY_MS + i, &[("a", 1.0)]))
        .collect();
    store.append_batch(batch).await.expect("append");
    // A long reader of the table: dropping a partition needs it exclusively.
    let (reader, driver) = db.connect().await;
    reader
        .batch_execute("BEGIN; LOCK TABLE telemetry_points IN ACCESS SHARE MODE")
        .await
        .expect("lock");
    let cutoff = (day + 1) * DAY_MS;
    let deleted = store
        .delete_older_than(cutoff, 4)
        .await
        .expect("retention does not wait for the lock");
    assert_eq!(deleted, 4, "rows deleted instead, at most max_rows");
    assert!(partitions(&db).await.contains(&partition(day)));
    reader.batch_execute("COMMIT").await.expect("unlock");
    drop(reader);
    let _ = driver.await;
    // The drop is tried again only after a pause; meanwhile the rows go in chunks.
    assert_eq!(
        store.delete_older_than(cutoff, 4).await.expect("retention"),
        2
    );
    assert_eq!(
        store.delete_older_than(cutoff, 4).await.expect("retention"),
        0
    );
    assert!(partitions(&db).await.contains(&partition(day)));
    // Another server (or this one after the pause) drops the now empty partition.
    let other = db.store().await;
    assert_eq!(
        other.delete_older_than(cutoff, 4).await.expect("retention"),
        0
    );
    assert!(!partitions(&db).await.contains(&partition(day)));
}

#[tokio::test]
async fn points_far_from_today_go_to_the_default_partition() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let future = (today() + 400) * DAY_MS;
    store
        .append_batch(vec![
            rec("d1", Some(1), 1_000, &[("a", 1.0)]),
            rec("d1", Some(2), future, &[("a", 2.0)]),
            rec("d1", Some(3), mooring_store::TS_MS_MAX, &[("a", 3.0)]),
        ])
        .await
        .expect("append");
    assert_eq!(
        points_per_partition(&db).await,
        BTreeMap::from([("telemetry_points_default".to_owned(), 3)]),
        "no partition for those days"
    );
    assert_eq!(store.query(all_points("d1")).await.expect("query").len(), 3);
    // Retention deletes rows there too: one point and its key.
    assert_eq!(
        store.delete_older_than(2_000, 10).await.expect("retention"),
        2
    );
    assert_eq!(store.query(all_points("d1")).await.expect("query").len(), 2);
}

#[tokio::test]
async fn a_new_day_partition_takes_over_its_points_from_the_default_partition() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let day = today() + 3;
    // A point written while the day had no partition (as a server whose creation failed would).
    db.execute(&format!(
        "WITH s AS (INSERT INTO telemetry_series (device_id, metric) VALUES ('d1', 'a') RETURNING id)
         INSERT INTO telemetry_points (series_id, ts_ms, value, is_bool)
         SELECT id, {}, 1.0, false FROM s",
        day * DAY_MS + 5
    ))
    .await;
    assert_eq!(
        points_per_partition(&db).await,
        BTreeMap::from([("telemetry_points_default".to_owned(), 1)])
    );
    store
        .append_batch(vec![rec("d1", None, day * DAY_MS + 10, &[("a", 2.0)])])
        .await
        .expect("append");
    assert_eq!(
        points_per_partition(&db).await,
        BTreeMap::from([(partition(day), 2)])
    );
    let values: Vec<(u64, MetricValue)> = store
        .query(all_points("d1"))
        .await
        .expect("query")
        .into_iter()
        .map(|p| (p.ts_ms, p.value))
        .collect();
    assert_eq!(
        values,
        [
            (day * DAY_MS + 5, MetricValue::Number(1.0)),
            (day * DAY_MS + 10, MetricValue::Number(2.0))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servers_creating_one_partition_at_once_create_it_once() {
    let db = TestDb::create().await;
    let day = today() - 20;
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(Arc::new(db.store().await));
    }
    let mut appends = tokio::task::JoinSet::new();
    for (i, store) in stores.iter().enumerate() {
        let store = Arc::clone(store);
        appends.spawn(async move {
            let batch = (0..25u64)
                .map(|j| rec("d1", None, day * DAY_MS + j, &[(&format!("m{i}"), 1.0)]))
                .collect();
            store.append_batch(batch).await
        });
    }
    while let Some(joined) = appends.join_next().await {
        let outcomes = joined.expect("task").expect("append");
        assert!(outcomes.iter().all(|o| *o == AppendOutcome::Stored));
    }
    let names = partitions(&db).await;
    assert_eq!(
        names.iter().filter(|n| **n == partition(day)).count(),
        1,
        "{names:?}"
    );
    assert_eq!(
        points_per_partition(&db).await.get(&partition(day)),
        Some(&100),
        "every point in the day's partition, none in the default one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_from_two_servers_never_exceed_the_metric_bound() {
    const BOUND: usize = 5;
    let db = TestDb::create().await;
    let servers = [Arc::new(db.store().await), Arc::new(db.store().await)];
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..40u64 {
        let store = Arc::clone(&servers[usize::try_from(i % 2).expect("small")]);
        appends.spawn(async move {
            // Each batch names two metrics no other batch names.
            let batch = vec![rec(
                "d1",
                Some(i),
                today() * DAY_MS + i,
                &[(&format!("m{i}a"), 1.0), (&format!("m{i}b"), 1.0)],
            )];
            store.append_batch_bounded(batch, BOUND).await
        });
    }
    let mut stored = 0;
    while let Some(joined) = appends.join_next().await {
        match joined.expect("task").expect("append")[..] {
            [AppendOutcome::Stored] => stored += 1,
            [AppendOutcome::MetricsLimit] => {}
            ref other => panic!("{other:?}"),
        }
    }
    assert_eq!(stored, BOUND / 2, "two names each: only two batches fit");
    let latest = servers[0].latest("d1").await.expect("latest");
    assert_eq!(latest.len(), 2 * (BOUND / 2));
    let series: i64 = db
        .execute("SELECT count(*) FROM telemetry_series WHERE device_id = 'd1' AND metric <> ''")
        .await[0]
        .get(0);
    assert_eq!(series, i64::try_from(2 * (BOUND / 2)).expect("small"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_idempotency_key_on_two_servers_at_once_is_one_command() {
    let db = TestDb::create().await;
    let servers = [Arc::new(db.store().await), Arc::new(db.store().await)];
    servers[0]
        .create_device(device("d1"))
        .await
        .expect("device");
    let mut creates = tokio::task::JoinSet::new();
    for i in 0..20u64 {
        let store = Arc::clone(&servers[usize::try_from(i % 2).expect("small")]);
        creates.spawn(async move {
            let mut c = command(&format!("c{i}"), "d1");
            c.idempotency_key = Some("once".into());
            store.create_commands(None, vec![c]).await
        });
    }
    let mut created = Vec::new();
    let mut existing = Vec::new();
    while let Some(joined) = creates.join_next().await {
        match joined.expect("task").expect("create").remove(0) {
            CreateOutcome::Created(c) => created.push(c),
            CreateOutcome::Existing(c) => existing.push(c),
        }
    }
    assert_eq!(created.len(), 1);
    assert!(existing.iter().all(|c| *c == created[0]));
    let listed = servers[1]
        .list_commands("d1", None, 100, None)
        .await
        .expect("list");
    assert_eq!(listed, created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_attaches_to_one_gateway_on_two_servers_respect_its_bound() {
    const BOUND: usize = 3;
    let db = TestDb::create().await;
    let servers = [Arc::new(db.store().await), Arc::new(db.store().await)];
    for i in 0..20 {
        servers[0]
            .create_device(device(&format!("c{i:02}")))
            .await
            .expect("child");
    }
    servers[0]
        .create_device(device("g"))
        .await
        .expect("gateway");
    let mut attaches = tokio::task::JoinSet::new();
    for i in 0..20u64 {
        let store = Arc::clone(&servers[usize::try_from(i % 2).expect("small")]);
        attaches.spawn(async move {
            store
                .attach_child(&format!("c{i:02}"), "g", 1_000 + i, BOUND)
                .await
        });
    }
    let mut attached = 0;
    while let Some(joined) = attaches.join_next().await {
        match joined.expect("task").expect("attach") {
            AttachOutcome::Attached(None) => attached += 1,
            AttachOutcome::GatewayFull => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(attached, BOUND);
    let children = servers[1]
        .children_of("g", None, 100)
        .await
        .expect("children");
    assert_eq!(children.len(), BOUND);
}

/// `a -> b` and `b -> c` (and the like) attached at once: never both, so never a chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crossing_attaches_on_two_servers_never_make_a_chain() {
    let db = TestDb::create().await;
    let servers = [Arc::new(db.store().await), Arc::new(db.store().await)];
    for round in 0..10 {
        let ids: Vec<String> = (0..3).map(|i| format!("r{round}d{i}")).collect();
        for id in &ids {
            servers[0].create_device(device(id)).await.expect("device");
        }
        let (a, b) = (Arc::clone(&servers[0]), Arc::clone(&servers[1]));
        let (x, y) = (ids.clone(), ids.clone());
        let first = tokio::spawn(async move { a.attach_child(&x[0], &x[1], 1, 10).await });
        let second = tokio::spawn(async move { b.attach_child(&y[1], &y[2], 1, 10).await });
        let outcomes = [first.await.expect("task"), second.await.expect("task")];
        let ok = outcomes.iter().filter(|o| o.is_ok()).count();
        assert_eq!(ok, 1, "{outcomes:?}");
        assert!(
            outcomes
                .iter()
                .any(|o| matches!(o, Err(StoreError::InvalidInput(_)))),
            "{outcomes:?}"
        );
    }
}

/// The conformance case on two servers: every count lands, none is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_failures_counted_at_once_on_two_servers_are_all_counted() {
    let db = TestDb::create().await;
    let (a, b) = (db.store().await, db.store().await);
    mooring_store::conformance::login_failures_counted_at_once_are_all_counted(&a, &b).await;
}

#[tokio::test]
async fn deleting_a_device_removes_its_telemetry_from_every_partition() {
    let db = TestDb::create().await;
    let store = db.store().await;
    store.create_device(device("d1")).await.expect("d1");
    store.create_device(device("d2")).await.expect("d2");
    store
        .append_batch(vec![
            rec(
                "d1",
                Some(1),
                (today() - 3) * DAY_MS,
                &[("a", 1.0), ("b", 1.0)],
            ),
            rec("d1", Some(2), (today() - 2) * DAY_MS, &[("a", 1.0)]),
            rec("d1", Some(3), 5, &[("a", 1.0)]),
            rec("d2", Some(1), (today() - 2) * DAY_MS, &[("a", 1.0)]),
        ])
        .await
        .expect("append");
    assert!(store.delete_device("d1").await.expect("delete"));
    let count = |table: &'static str| {
        let db = &db;
        async move {
            let rows = db.execute(&format!("SELECT count(*) FROM {table}")).await;
            rows[0].get::<_, i64>(0)
        }
    };
    assert_eq!(count("telemetry_points").await, 1, "d2's point only");
    assert_eq!(count("telemetry_seq").await, 1);
    assert_eq!(count("telemetry_latest").await, 1);
    assert_eq!(
        count("telemetry_series").await,
        2,
        "d2's metric and key series"
    );
    assert_eq!(store.query(all_points("d2")).await.expect("query").len(), 1);
}

#[tokio::test]
async fn corrupt_rows_are_errors_not_panics() {
    let db = TestDb::create().await;
    let store = db.store().await;
    store.create_device(device("d1")).await.expect("device");
    store
        .append_batch(vec![rec("d1", Some(1), 1_000, &[("a", 1.0)])])
        .await
        .expect("append");
    store
        .create_commands(None, vec![command("c1", "d1")])
        .await
        .expect("command");
    store
        .save_shadow(
            ShadowRecord {
                version: 1,
                ..ShadowRecord::empty(mooring_proto::DeviceId::parse("d1").expect("id"))
            },
            0,
        )
        .await
        .expect("shadow");
    store
        .apply_broker_ops(vec![BrokerOp::PutSession {
            key: "s".into(),
            value: b"v".to_vec(),
        }])
        .await
        .expect("session");
    for sql in [
        "UPDATE telemetry_latest SET ts_ms = -5",
        "UPDATE commands SET attempts = -1",
        "UPDATE shadows SET desired = '[1]'",
        "INSERT INTO broker_messages (session, seq, value) VALUES ('s', -1, '\\x00')",
    ] {
        db.execute(sql).await;
    }
    let backend = |e: StoreError| e.kind() == "backend";
    assert!(store.latest("d1").await.is_err_and(backend));
    assert!(store.get_command("c1").await.is_err_and(backend));
    assert!(store.get_shadow("d1").await.is_err_and(backend));
    assert!(store.load_broker_state().await.is_err_and(backend));
    db.execute("UPDATE commands SET attempts = 0, history = '[[\"bogus\", 1]]'")
        .await;
    assert!(store.get_command("c1").await.is_err_and(backend));
}

/// PostgreSQL text cannot hold U+0000, which a device's JSON key or an MQTT topic can: such a
/// name must be stored (as SQLite stores it), not fail the batch it shares with others.
#[tokio::test]
async fn names_with_a_nul_character_are_stored_like_any_other() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let odd = "a\u{0}b";
    let outcomes = store
        .append_batch(vec![
            rec("d1", Some(1), 1_000, &[(odd, 1.0), ("ok", 2.0)]),
            rec("d2", Some(1), 1_000, &[("ok", 3.0)]),
        ])
        .await
        .expect("append");
    assert_eq!(outcomes, [AppendOutcome::Stored, AppendOutcome::Stored]);
    let metrics: Vec<String> = store
        .query(all_points("d1"))
        .await
        .expect("query")
        .into_iter()
        .map(|p| p.metric)
        .collect();
    assert_eq!(metrics, [odd, "ok"]);
    let mut one = all_points("d1");
    one.metric = Some(odd.to_owned());
    assert_eq!(store.query(one).await.expect("query one").len(), 1);
    assert!(store.latest("d1").await.expect("latest").contains_key(odd));

    let topic = "t/\u{0}";
    let session = "s:\u{0}";
    store
        .apply_broker_ops(vec![
            BrokerOp::PutRetained {
                topic: topic.into(),
                value: b"r".to_vec(),
            },
            BrokerOp::PutSession {
                key: session.into(),
                value: b"s".to_vec(),
            },
            BrokerOp::PutMessage {
                session: session.into(),
                seq: 1,
                value: b"m".to_vec(),
            },
        ])
        .await
        .expect("apply");
    let state = store.load_broker_state().await.expect("load");
    assert_eq!(state.retained, [(topic.to_owned(), b"r".to_vec())]);
    assert_eq!(state.sessions[0].key, session);
    assert_eq!(state.sessions[0].messages, [(1, b"m".to_vec())]);
}

fn device(id: &str) -> mooring_store::NewDevice {
    mooring_store::NewDevice {
        id: mooring_proto::DeviceId::parse(id).expect("test id"),
        tags: BTreeMap::new(),
        created_at_ms: 1,
        cert_sha256: format!("sha-{id}"),
        cert_serial: format!("serial-{id}"),
        cert_not_after_ms: 2,
        cert_issuer: mooring_store::CERT_ISSUER_FLEET.to_owned(),
    }
}

fn command(id: &str, device: &str) -> CommandRecord {
    CommandRecord {
        id: id.to_owned(),
        device_id: mooring_proto::DeviceId::parse(device).expect("test id"),
        name: "reboot".to_owned(),
        params: serde_json::json!({"z": 1, "a": [true, null, 1.5]}),
        state: CommandState::Queued,
        attempts: 0,
        max_attempts: 5,
        created_at_ms: 1_000,
        expires_at_ms: 61_000,
        next_attempt_at_ms: 1_000,
        parent_id: None,
        idempotency_key: None,
        history: vec![(CommandState::Queued, 1_000)],
        result: None,
        result_timeout_ms: 0,
        synced_at_ms: None,
    }
}

/// Not a test of behaviour: how long 100,000 points take through `append_batch` in batches of
/// 1,000 (one record per point, a seq each, 100 devices). Run it with
/// `cargo test -p mooring-store --test postgres --release -- --ignored --nocapture append_rate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn append_rate_100k_points_in_batches_of_1000() {
    const BATCHES: u64 = 100;
    const BATCH_LEN: u64 = 1_000;
    let db = TestDb::create().await;
    let store = db.store().await;
    let t0 = (today() - 1) * DAY_MS;
    let started = std::time::Instant::now();
    for b in 0..BATCHES {
        let batch = (0..BATCH_LEN)
            .map(|i| {
                let n = b * BATCH_LEN + i;
                rec(
                    &format!("dev{}", n % 100),
                    Some(n),
                    t0 + n,
                    &[("temp", 20.5)],
                )
            })
            .collect();
        let outcomes = store.append_batch(batch).await.expect("append");
        assert!(outcomes.iter().all(|o| *o == AppendOutcome::Stored));
    }
    let elapsed = started.elapsed();
    #[allow(clippy::cast_precision_loss)]
    let rate = (BATCHES * BATCH_LEN) as f64 / elapsed.as_secs_f64();
    println!(
        "appended {} points in {BATCHES} batches of {BATCH_LEN}: {elapsed:?} ({rate:.0} points/s)",
        BATCHES * BATCH_LEN
    );
}
