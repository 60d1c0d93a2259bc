//! The device and token conformance cases and PostgreSQL-specific behaviour (migrations under
//! concurrent start, schema too new, unreachable server), each test on a database of its own.
//!
//! Needs PostgreSQL at `MOORING_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`, as in CI): every test creates a throwaway database
//! `mooring_test_<pid>_<nanos>_<n>` from there and drops it (`WITH (FORCE)`) when it ends. If the
//! server is unreachable the tests fail, saying so: they are never skipped.
#![cfg(feature = "postgres")]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mooring_store::{DeviceStore, PgStore, StoreError};
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
        let (client, connection) = self.config().connect(NoTls).await.expect("connect");
        let driver = tokio::spawn(connection);
        let rows = client.query(sql, &[]).await.expect(sql);
        drop(client);
        let _ = driver.await;
        rows
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

async fn fresh_store() -> (Arc<PgStore>, TestDb) {
    let db = TestDb::create().await;
    let store = db.store().await;
    (Arc::new(store), db)
}

mooring_store::conformance_device_token_tests!(fresh_store);
mooring_store::conformance_cluster_tests!(fresh_store);

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
