//! The services' behaviour without a subprocess: a server started in-process, driven through
//! its services (`app.registry`, `app.telemetry`, `app.commands`, `app.shadows`), as the HTTP
//! handlers, the MQTT hooks and the simulator use them. The end-to-end tests of the binary stay
//! in crates/mooring/tests.

mod support;

use std::collections::BTreeMap;

use mooring_server::commands::NewCommand;
use mooring_server::error::ErrorKind;
use mooring_server::registry::PinnedCert;
use mooring_server::telemetry::Ingest;
use mooring_server::RunningServer;
use mooring_store::CommandState;
use serde_json::json;

async fn start(dir: &std::path::Path) -> RunningServer {
    support::start(dir, false).await
}

fn cert(id: &str) -> PinnedCert {
    PinnedCert {
        sha256_hex: format!("{:0>64}", hex::encode(id)),
        serial_hex: hex::encode(id),
        not_after_ms: 4_102_444_800_000,
        issuer: mooring_store::CERT_ISSUER_FLEET.to_owned(),
    }
}

#[tokio::test]
async fn registry_telemetry_commands_and_shadows_through_their_services() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let app = server.app.clone();

    // Registry: invalid input is refused with a kind the API maps to 400, nothing stored.
    let bad = app
        .registry
        .create_device_pinned("bad/id", BTreeMap::new(), cert("x"))
        .await
        .expect_err("a '/' in an id");
    assert_eq!(bad.kind, ErrorKind::InvalidArgument);
    let tags = BTreeMap::from([("site".to_owned(), "berlin".to_owned())]);
    app.registry
        .create_device_pinned("lock-1", tags, cert("lock-1"))
        .await
        .expect("create");
    let view = app
        .registry
        .get_device(&mooring_server::access::Access::all(), "lock-1")
        .await
        .expect("get");
    assert!(!view.online);
    assert_eq!(
        view.record.tags.get("site").map(String::as_str),
        Some("berlin")
    );

    // Telemetry: stored once, a repeated seq is a duplicate, garbage is refused. (A current
    // timestamp: the retention pass at start would delete an old point with its dedupe key.)
    let now = app.now_ms();
    let payload = format!(r#"{{"seq": 1, "ts": {now}, "temp": 21.5}}"#);
    assert!(matches!(
        app.telemetry
            .ingest(&lock1(), payload.as_bytes(), now)
            .await,
        Ingest::Stored
    ));
    assert!(matches!(
        app.telemetry
            .ingest(&lock1(), payload.as_bytes(), now)
            .await,
        Ingest::Duplicate
    ));
    assert!(matches!(
        app.telemetry.ingest(&lock1(), b"not json", now).await,
        Ingest::Invalid(_)
    ));
    let latest = app
        .telemetry
        .latest(&mooring_server::access::Access::all(), "lock-1")
        .await
        .expect("latest");
    assert_eq!(latest.get("temp").map(|(ts, _)| *ts), Some(now));

    // Commands: queued for an offline device, cancelled, and a cancelled one cannot be again.
    let (_, cmd) = app
        .commands
        .create_command(
            &mooring_server::access::Access::all(),
            "lock-1",
            NewCommand {
                name: "unlock".into(),
                params: json!({"secs": 5}),
                ttl_secs: None,
                max_attempts: None,
                idempotency_key: Some("k1".into()),
                result_timeout_secs: None,
            },
            None,
        )
        .await
        .expect("create command");
    assert_eq!(cmd.state, CommandState::Queued);
    let canceled = app
        .commands
        .cancel_command(&mooring_server::access::Access::all(), "lock-1", &cmd.id)
        .await
        .expect("cancel");
    assert_eq!(canceled.state, CommandState::Canceled);
    let again = app
        .commands
        .cancel_command(&mooring_server::access::Access::all(), "lock-1", &cmd.id)
        .await
        .expect_err("final");
    assert_eq!(again.kind, ErrorKind::Conflict);
    let missing = app
        .commands
        .get_command(
            &mooring_server::access::Access::all(),
            "lock-1",
            "nope",
            None,
        )
        .await
        .expect_err("unknown id");
    assert_eq!(missing.kind, ErrorKind::NotFound);

    // Shadows: desired → delta; a device report that matches clears it.
    let s = app
        .shadows
        .patch_desired(
            &mooring_server::access::Access::all(),
            "lock-1",
            json!({"led": "on"}),
            None,
        )
        .await
        .expect("patch");
    assert_eq!(s.version, 1);
    assert_eq!(s.delta.get("led"), Some(&json!("on")));
    assert!(app
        .shadows
        .on_reported(&lock1(), br#"{"led": "on"}"#)
        .await
        .expect("report"));
    let s = app
        .shadows
        .get(&mooring_server::access::Access::all(), "lock-1")
        .await
        .expect("get shadow");
    assert!(s.delta.is_empty(), "{:?}", s.delta);
    assert_eq!(s.version, 2);
    let stale = app
        .shadows
        .patch_desired(
            &mooring_server::access::Access::all(),
            "lock-1",
            json!({"led": "off"}),
            Some(1),
        )
        .await
        .expect_err("if_match on an old version");
    assert_eq!(stale.kind, ErrorKind::PreconditionFailed);

    // Deleting the device takes its data with it.
    app.registry
        .delete_device(&mooring_server::access::Access::all(), "lock-1")
        .await
        .expect("delete");
    let gone = app
        .registry
        .get_device(&mooring_server::access::Access::all(), "lock-1")
        .await
        .expect_err("gone");
    assert_eq!(gone.kind, ErrorKind::NotFound);
    drop(app);
    server.shutdown().await;
}

fn lock1() -> mooring_proto::DeviceId {
    mooring_proto::DeviceId::parse("lock-1").expect("valid id")
}

/// The server stops between storing that an update command failed and failing its update (the
/// commands service does the two one after the other): the OTA sweep (at start, then every
/// `[ota] sweep_interval_ms`) finds the update still pending, unreported, with an ended command,
/// and fails it with the reason.
#[tokio::test]
async fn an_update_left_pending_by_a_stop_after_its_command_failed_is_failed_by_the_sweep() {
    use mooring_server::access::Access;
    use mooring_store::{CommandOutcome, CommandStore};
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let app = server.app.clone();
    support::pinned_device(&app, "ota-1", 0xcd).await;
    let a = support::ready_artifact(&app, "2.0.0", &[3u8; 4096]).await;
    let (view, pending) = app
        .ota
        .deploy(&Access::all(), "test", &a.id, "id:ota-1", false)
        .await
        .expect("deploy");
    app.ota.send_updates(pending).await;
    let dep = view.deployment.id;
    drop(app);
    server.shutdown().await;

    // What the commands service stored before the stop: the command failed (the device said it
    // has no updater); the update was never failed.
    let store = mooring_store::SqliteStore::open(dir.path()).expect("store");
    let cmd = store
        .list_commands("ota-1", None, 10, None)
        .await
        .expect("commands")
        .pop()
        .expect("the update command");
    let mut failed = cmd.clone();
    failed.state = CommandState::Failed;
    failed
        .history
        .push((CommandState::Failed, cmd.created_at_ms + 1));
    failed.result = Some(CommandOutcome {
        succeeded: false,
        output: json!({"reason": "no updater"}),
    });
    assert!(store
        .update_command(failed, cmd.state)
        .await
        .expect("fail the command"));
    drop(store);

    let server = start(dir.path()).await;
    let app = server.app.clone();
    // The sweep runs at start; one more pass here makes the outcome certain before reading it
    // (whichever pass came first did the work, the other finds nothing left).
    app.ota.fail_ended_updates().await.expect("sweep");
    let history = app
        .ota
        .device_history(&Access::all(), "ota-1")
        .await
        .expect("history");
    assert_eq!(history[0].deployment_id, dep);
    assert_eq!(history[0].state, mooring_proto::ota::UpdateState::Failed);
    assert_eq!(
        history[0].reason.as_deref(),
        Some("command_failed: no updater")
    );
    assert!(
        app.ota.fail_ended_updates().await.expect("sweep") == 0,
        "nothing is left for the next pass"
    );
    drop(app);
    server.shutdown().await;
}
