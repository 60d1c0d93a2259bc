//! The conformance suite and SQLite-specific behaviour (persistence, migrations) on a temp dir.

use std::collections::BTreeMap;
use std::sync::Arc;

use mooring_store::{
    AppendOutcome, DeviceStore, MetricValue, NewDevice, Role, SqliteStore, Store, StoreError,
    TelemetryQuery, TelemetryRecord, TelemetryStore, TokenRecord, TokenStore, DB_FILE_NAME,
};
use std::os::unix::fs::PermissionsExt;

async fn fresh_store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("create temp dir");
    let store = SqliteStore::open(dir.path()).expect("open sqlite store");
    (Arc::new(store), dir)
}

mooring_store::conformance_tests!(fresh_store);

fn device(id: &str) -> NewDevice {
    NewDevice {
        id: mooring_proto::DeviceId::parse(id).expect("test id"),
        tags: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
        created_at_ms: 1,
        cert_sha256: format!("sha-{id}"),
        cert_serial: format!("serial-{id}"),
        cert_not_after_ms: 2,
        cert_issuer: mooring_store::CERT_ISSUER_FLEET.to_owned(),
    }
}

fn record(seq: u64) -> TelemetryRecord {
    TelemetryRecord {
        device_id: mooring_proto::DeviceId::parse("d1").expect("test id"),
        seq: Some(seq),
        ts_ms: 1_000 + seq,
        points: vec![
            ("temp".into(), MetricValue::Number(20.5)),
            ("door".into(), MetricValue::Bool(false)),
        ],
    }
}

#[tokio::test]
async fn reopening_the_data_dir_keeps_data_and_dedupe_and_migrations_are_idempotent() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let store = SqliteStore::open(dir.path()).expect("first open");
        assert_eq!(store.path(), dir.path().join(DB_FILE_NAME));
        store.create_device(device("d1")).await.expect("create");
        store
            .create_token(TokenRecord {
                id: "t1".into(),
                name: "ci".into(),
                role: Role::Service,
                token_sha256: "h".into(),
                created_at_ms: 3,
                scope: None,
                expires_at_ms: None,
                last_used_at_ms: None,
            })
            .await
            .expect("token");
        let outcomes = store
            .append_batch(vec![record(1), record(2)])
            .await
            .expect("append");
        assert_eq!(outcomes, [AppendOutcome::Stored, AppendOutcome::Stored]);
    }
    for _ in 0..2 {
        let store = SqliteStore::open(dir.path()).expect("reopen");
        let d = store
            .get_device("d1")
            .await
            .expect("get")
            .expect("device survives");
        assert_eq!(d.tags.get("k").map(String::as_str), Some("v"));
        assert!(store.find_token("h").await.expect("find").is_some());
        let points = store
            .query(TelemetryQuery {
                device_id: mooring_proto::DeviceId::parse("d1").expect("test id"),
                metric: Some("door".into()),
                from_ms: None,
                to_ms: None,
                limit: 10,
            })
            .await
            .expect("query");
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].value, MetricValue::Bool(false));
        // Dedupe survives a restart.
        let outcomes = store.append_batch(vec![record(2)]).await.expect("append");
        assert_eq!(outcomes, [AppendOutcome::Duplicate]);
        assert_eq!(store.latest("d1").await.expect("latest").len(), 2);
    }
}

#[tokio::test]
async fn opens_an_explicit_database_file_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("nested/fleet.sqlite");
    let store = SqliteStore::open(&file).expect("open file path");
    assert_eq!(store.path(), file);
    store.create_device(device("d1")).await.expect("create");
    assert!(file.is_file());
}

#[tokio::test]
async fn refuses_a_database_from_a_newer_schema() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("db.sqlite");
    drop(SqliteStore::open(&file).expect("create"));
    {
        let conn = rusqlite::Connection::open(&file).expect("raw open");
        conn.pragma_update(None, "user_version", 999)
            .expect("bump version");
    }
    let err = SqliteStore::open(&file).expect_err("newer schema must be refused");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 999, .. }),
        "{err:?}"
    );
    assert_eq!(err.kind(), "schema_too_new");
    let message = err.to_string();
    assert!(
        message.contains("schema version 999")
            && message.contains(&format!(
                "up to {}",
                mooring_store::sqlite::schema_version()
            )),
        "the message names both versions: {message}"
    );
}

#[tokio::test]
async fn backup_of_an_open_store_holds_every_committed_write_in_one_private_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The store stays open (as a running server's does): its last writes are still in the WAL.
    let store = SqliteStore::open(dir.path()).expect("open");
    store.create_device(device("d1")).await.expect("create");
    let batch = (1..=50).map(record).collect();
    store.append_batch(batch).await.expect("append");
    let copy = dir.path().join("copy.db");
    let info = mooring_store::backup_database(store.path(), &copy).expect("backup");
    assert_eq!(info.schema_version, mooring_store::sqlite::schema_version());
    assert_eq!(info.bytes, std::fs::metadata(&copy).expect("copy").len());
    let mode = std::fs::metadata(&copy).expect("copy").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the copy is private");
    assert!(
        !dir.path().join("copy.db-wal").exists(),
        "the copy is one self-contained file"
    );
    // Writes after the backup are not in it.
    store.create_device(device("d2")).await.expect("create d2");

    let restored = SqliteStore::open(&copy).expect("open the copy");
    assert!(restored.get_device("d1").await.expect("get").is_some());
    assert!(restored.get_device("d2").await.expect("get").is_none());
    let points = restored
        .query(TelemetryQuery {
            device_id: mooring_proto::DeviceId::parse("d1").expect("test id"),
            metric: Some("temp".into()),
            from_ms: None,
            to_ms: None,
            limit: 100,
        })
        .await
        .expect("query");
    assert_eq!(points.len(), 50);
    // Dedupe keys came along: a resent seq is still a duplicate.
    let again = restored
        .append_batch(vec![record(7)])
        .await
        .expect("append");
    assert_eq!(again, vec![AppendOutcome::Duplicate]);
}

#[tokio::test]
async fn backup_refuses_an_existing_target_and_a_missing_source() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path()).expect("open");
    let taken = dir.path().join("taken.db");
    std::fs::write(&taken, b"keep me").expect("write");
    let err = mooring_store::backup_database(store.path(), &taken).expect_err("exists");
    assert_eq!(err.kind(), "already_exists", "{err}");
    assert_eq!(std::fs::read(&taken).expect("read"), b"keep me");
    let err = mooring_store::backup_database(&dir.path().join("nope.db"), &dir.path().join("x.db"))
        .expect_err("missing source");
    assert_eq!(err.kind(), "not_found", "{err}");
    assert!(!dir.path().join("x.db").exists());
    assert!(
        !dir.path().join("nope.db").exists(),
        "a missing source is not created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_proceed_while_ingest_is_running() {
    let (store, _dir) = fresh_store().await;
    store.create_device(device("d1")).await.expect("create");
    let writer_store = Arc::clone(&store);
    let ingest = tokio::spawn(async move {
        for chunk in 0..20u64 {
            let batch = (0..100).map(|i| record(chunk * 100 + i)).collect();
            writer_store.append_batch(batch).await.expect("append");
        }
    });
    for _ in 0..20 {
        assert!(store
            .get_device("d1")
            .await
            .expect("read during ingest")
            .is_some());
    }
    ingest.await.expect("ingest task");
    assert_eq!(store.latest("d1").await.expect("latest").len(), 2);
}

/// Builds a database at schema 4 (telemetry as one text-keyed row per point) with points of two
/// devices, dedupe keys and latest values, as a pre-0005 Mooring left it.
fn old_layout_database(file: &std::path::Path) {
    let mut conn = rusqlite::Connection::open(file).expect("raw open");
    for sql in [
        include_str!("../migrations/0001_init.sql"),
        include_str!("../migrations/0002_commands_shadows.sql"),
        include_str!("../migrations/0003_command_result_timeout.sql"),
        include_str!("../migrations/0004_broker_state.sql"),
    ] {
        conn.execute_batch(sql).expect("old migration");
    }
    conn.pragma_update(None, "user_version", 4)
        .expect("version");
    let conn = conn.transaction().expect("one transaction");
    let t0: i64 = 1_767_225_600_000;
    for i in 0..500i64 {
        for (device, metric, value, is_bool) in [
            ("d1", "temp", 20.0 + i as f64 / 10.0, 0),
            ("d1", "door", (i % 2) as f64, 1),
            ("d2", "temp", -(i as f64), 0),
        ] {
            conn.execute(
                "INSERT INTO telemetry (device_id, metric, ts_ms, value, is_bool) VALUES (?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![device, metric, t0 + i * 60_000, value, is_bool],
            )
            .expect("point");
        }
        for device in ["d1", "d2"] {
            conn.execute(
                "INSERT INTO telemetry_seq (device_id, seq, ts_ms) VALUES (?1, ?2, ?3)",
                rusqlite::params![device, 7_000 + i, t0 + i * 60_000],
            )
            .expect("seq");
        }
    }
    conn.execute_batch(&format!(
        "INSERT INTO telemetry_latest (device_id, metric, ts_ms, value, is_bool) VALUES
           ('d1', 'temp', {last}, 69.9, 0), ('d1', 'door', {last}, 1.0, 1),
           ('d2', 'temp', {last}, -499.0, 0), ('d3', 'gone', 5, 1.0, 0);",
        last = t0 + 499 * 60_000
    ))
    .expect("latest");
    conn.commit().expect("commit");
}

#[tokio::test]
async fn an_old_layout_database_migrates_and_reads_back_the_same() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("old.sqlite");
    old_layout_database(&file);
    let store = SqliteStore::open(&file).expect("migrate");
    let q = |device: &str, metric: Option<&str>| TelemetryQuery {
        device_id: mooring_proto::DeviceId::parse(device).expect("id"),
        metric: metric.map(str::to_owned),
        from_ms: None,
        to_ms: None,
        limit: 100_000,
    };
    let t0 = 1_767_225_600_000u64;
    let d1 = store.query(q("d1", None)).await.expect("d1");
    assert_eq!(d1.len(), 1000);
    for (i, pair) in d1.chunks(2).enumerate() {
        let ts = t0 + i as u64 * 60_000;
        assert_eq!(pair[0].metric, "temp", "ties keep the old insertion order");
        assert_eq!(pair[0].ts_ms, ts);
        assert_eq!(pair[0].value, MetricValue::Number(20.0 + i as f64 / 10.0));
        assert_eq!(pair[1].metric, "door");
        assert_eq!(pair[1].value, MetricValue::Bool(i % 2 == 1));
    }
    let d2 = store.query(q("d2", Some("temp"))).await.expect("d2");
    assert_eq!(d2.len(), 500);
    assert_eq!(d2[499].value, MetricValue::Number(-499.0));
    let latest = store.latest("d1").await.expect("latest");
    assert_eq!(latest.len(), 2);
    assert_eq!(
        latest.get("door"),
        Some(&(t0 + 499 * 60_000, MetricValue::Bool(true)))
    );
    assert_eq!(store.latest("d3").await.expect("latest d3").len(), 1);
    let dup = |device: &str, seq: u64| TelemetryRecord {
        device_id: mooring_proto::DeviceId::parse(device).expect("id"),
        seq: Some(seq),
        ts_ms: t0,
        points: vec![("temp".into(), MetricValue::Number(0.0))],
    };
    assert_eq!(
        store
            .append_batch(vec![dup("d1", 7_000), dup("d2", 7_499)])
            .await
            .expect("append"),
        [AppendOutcome::Duplicate, AppendOutcome::Duplicate],
        "migrated dedupe keys still dedupe"
    );

    // Compacting the migrated rows changes no answer, and leaves them in chunks.
    mooring_store::run_compaction_pass(&store, u64::MAX, 10_000, 100)
        .await
        .expect("compact");
    assert_eq!(store.query(q("d1", None)).await.expect("d1"), d1);
    assert_eq!(store.query(q("d2", Some("temp"))).await.expect("d2"), d2);
    assert_eq!(
        store
            .append_batch(vec![dup("d1", 7_001)])
            .await
            .expect("append"),
        [AppendOutcome::Duplicate]
    );
    let conn = rusqlite::Connection::open(&file).expect("raw open");
    let count = |table: &str| -> i64 {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
            row.get(0)
        })
        .expect("count")
    };
    assert_eq!(count("telemetry_points"), 0);
    assert_eq!(count("telemetry_seq"), 0);
    // 500 minutes = 9 hour windows for each of 3 series and 2 key series.
    assert_eq!(count("telemetry_chunks"), 5 * 9);
}

/// A database from before the certificate ledger (schema 9): migration 10 enters each device's
/// pinned certificate as its active ledger row; a certificate two devices share goes to the
/// first (by id), the second keeps its device row.
#[tokio::test]
async fn the_certificate_ledger_is_backfilled_from_the_pinned_certificates() {
    use mooring_store::{CertState, CertStore};
    let dir = tempfile::tempdir().expect("tmp");
    {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE_NAME)).expect("raw open");
        for sql in [
            include_str!("../migrations/0001_init.sql"),
            include_str!("../migrations/0002_commands_shadows.sql"),
            include_str!("../migrations/0003_command_result_timeout.sql"),
            include_str!("../migrations/0004_broker_state.sql"),
            include_str!("../migrations/0005_telemetry_series_chunks.sql"),
            include_str!("../migrations/0006_cluster.sql"),
            include_str!("../migrations/0007_accounts.sql"),
            include_str!("../migrations/0008_fleet_samples.sql"),
            include_str!("../migrations/0009_jobs.sql"),
        ] {
            conn.execute_batch(sql).expect("old migration");
        }
        conn.pragma_update(None, "user_version", 9)
            .expect("version");
        conn.execute_batch(
            "INSERT INTO devices (id, tags, created_at_ms, cert_sha256, cert_serial, cert_not_after_ms)
             VALUES ('a', '{}', 10, 'sha-a', '0a', 1000),
                    ('b', '{}', 20, 'sha-shared', '0b', 2000),
                    ('c', '{}', 30, 'sha-shared', '0c', 3000);",
        )
        .expect("devices");
    }
    let store = SqliteStore::open(dir.path()).expect("open migrates");
    let a = store
        .get_cert("0a")
        .await
        .expect("get")
        .expect("backfilled");
    assert_eq!(
        (
            a.device_id.as_str(),
            a.sha256.as_str(),
            a.not_after_ms,
            a.state
        ),
        ("a", "sha-a", 1000, CertState::Active)
    );
    assert_eq!(
        (a.not_before_ms, a.issued_at_ms, a.issuer.as_str()),
        (10, 10, "fleet")
    );
    let shared = store
        .find_cert_by_sha256("sha-shared")
        .await
        .expect("find")
        .expect("one row");
    assert_eq!(shared.device_id.as_str(), "b");
    assert_eq!(store.get_cert("0c").await.expect("get"), None);
    assert!(store.get_device("c").await.expect("get").is_some());
}
