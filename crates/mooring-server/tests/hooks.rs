//! The MQTT hooks (`ServerHooks`) without a socket: what the broker asks the server at CONNECT,
//! on every PUBLISH and on (dis)connect, answered from a server started in-process, and what a
//! hook answers once the server is gone.

mod support;

use std::collections::BTreeMap;

use mooring_broker::{
    ConnInfo, ConnectRefusal, ConnectRequest, Hooks, ListenerKind, Message, ProtocolVersion,
    PublishVerdict,
};
use mooring_proto::policy::Principal;
use mooring_proto::DeviceId;
use mooring_server::commands::NewCommand;
use mooring_server::hooks::ServerHooks;
use mooring_server::registry::PinnedCert;
use mooring_server::RunningServer;
use mooring_store::{CommandState, Role};
use serde_json::json;

async fn start(dir: &std::path::Path) -> RunningServer {
    support::start(dir, false).await
}

const SHA: &str = "aa00000000000000000000000000000000000000000000000000000000000000";

fn tls(cert: Option<(&str, &str)>) -> ConnInfo {
    ConnInfo {
        peer: None,
        cert_identity: cert.map(|(cn, _)| cn.to_owned()),
        cert_sha256: cert.map(|(_, sha)| sha.to_owned()),
        cert_der: None,
        listener: ListenerKind::Tls,
    }
}

async fn connect(
    hooks: &ServerHooks,
    info: &ConnInfo,
    client_id: &str,
    password: Option<&[u8]>,
) -> Result<Principal, ConnectRefusal> {
    hooks
        .authenticate(ConnectRequest {
            info,
            client_id,
            username: None,
            password,
            protocol_version: ProtocolVersion::V5,
            clean_start: true,
        })
        .await
        .map(|a| a.principal)
}

#[tokio::test]
async fn connect_is_decided_by_the_pinned_certificate_the_client_id_and_service_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let app = server.app.clone();
    let hooks = ServerHooks::new(&app);
    let tags = BTreeMap::from([("site".to_owned(), "berlin".to_owned())]);
    let pinned = PinnedCert {
        sha256_hex: SHA.to_owned(),
        serial_hex: "01".into(),
        not_after_ms: 4_102_444_800_000,
        issuer: mooring_store::CERT_ISSUER_FLEET.to_owned(),
    };
    app.registry
        .create_device_pinned("lock-1", tags.clone(), pinned)
        .await
        .expect("create");

    // The device's own certificate: a device principal with its tags, empty client id allowed.
    let info = tls(Some(("lock-1", SHA)));
    for client_id in ["lock-1", ""] {
        match connect(&hooks, &info, client_id, None).await {
            Ok(Principal::Device { id, tags: t }) => {
                assert_eq!(id, "lock-1");
                assert_eq!(t, tags);
            }
            other => panic!("{client_id:?}: {other:?}"),
        }
    }
    // Another client id, a certificate that is not the pinned one, an unknown device.
    assert_eq!(
        connect(&hooks, &info, "lock-2", None).await.err(),
        Some(ConnectRefusal::BadClientId)
    );
    let other_cert = tls(Some(("lock-1", &"bb".repeat(32))));
    assert_eq!(
        connect(&hooks, &other_cert, "lock-1", None).await.err(),
        Some(ConnectRefusal::NotAuthorized)
    );
    let ghost = tls(Some(("ghost", SHA)));
    assert_eq!(
        connect(&hooks, &ghost, "ghost", None).await.err(),
        Some(ConnectRefusal::NotAuthorized)
    );

    // TLS without a certificate: a service token, never a device's client id; admin tokens and
    // wrong secrets are refused.
    let (_, secret) = app
        .tokens
        .create(mooring_server::auth::NewToken {
            name: "pipeline".into(),
            role: Role::Service,
            scope: None,
            expires_in_ms: None,
        })
        .await
        .expect("token");
    let anon = tls(None);
    assert!(matches!(
        connect(&hooks, &anon, "ingest-1", Some(secret.as_bytes())).await,
        Ok(Principal::Service { ref name, .. }) if name == "pipeline"
    ));
    assert_eq!(
        connect(&hooks, &anon, "lock-1", Some(secret.as_bytes()))
            .await
            .err(),
        Some(ConnectRefusal::BadClientId)
    );
    let (_, admin) = app
        .tokens
        .create(mooring_server::auth::NewToken {
            name: "ops".into(),
            role: Role::Admin,
            scope: None,
            expires_in_ms: None,
        })
        .await
        .expect("token");
    assert_eq!(
        connect(&hooks, &anon, "ops-1", Some(admin.as_bytes()))
            .await
            .err(),
        Some(ConnectRefusal::NotAuthorized)
    );
    assert_eq!(
        connect(&hooks, &anon, "x", Some(b"wrong")).await.err(),
        Some(ConnectRefusal::BadUsernameOrPassword)
    );
    assert_eq!(
        connect(&hooks, &anon, "x", None).await.err(),
        Some(ConnectRefusal::NotAuthorized)
    );

    // Once the server is gone the hooks (which hold it only weakly) refuse, they do not panic.
    drop(app);
    server.shutdown().await;
    assert_eq!(
        connect(&hooks, &info, "lock-1", None).await.err(),
        Some(ConnectRefusal::ServerUnavailable)
    );
    let device = Principal::Device {
        id: DeviceId::parse("lock-1").expect("id"),
        tags: BTreeMap::new(),
    };
    assert!(!hooks.may_publish(&device, "devices/lock-1/telemetry"));
}

/// The certificate ledger decides: an expired certificate, a revoked one, and another
/// device's certificate under this device's CN are refused; a second active certificate of the
/// device is accepted.
#[tokio::test]
async fn connect_needs_an_active_unexpired_certificate_of_the_device_in_the_ledger() {
    use mooring_server::access::Access;
    use mooring_server::registry::CertVerdict;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let app = server.app.clone();
    let hooks = ServerHooks::new(&app);
    let pinned = |sha: &str, serial: &str, not_after_ms: u64| PinnedCert {
        sha256_hex: sha.to_owned(),
        serial_hex: serial.to_owned(),
        not_after_ms,
        issuer: mooring_store::CERT_ISSUER_FLEET.to_owned(),
    };
    let (old, fresh, other) = ("a1".repeat(32), "b2".repeat(32), "c3".repeat(32));
    app.registry
        .create_device_pinned("old-1", BTreeMap::new(), pinned(&old, "0a", 1_000))
        .await
        .expect("create");
    app.registry
        .create_device_pinned(
            "new-1",
            BTreeMap::new(),
            pinned(&fresh, "0b", 4_102_444_800_000),
        )
        .await
        .expect("create");
    app.registry
        .create_device_pinned(
            "other-1",
            BTreeMap::new(),
            pinned(&other, "0c", 4_102_444_800_000),
        )
        .await
        .expect("create");

    assert_eq!(
        app.registry
            .check_certificate("old-1", &old)
            .await
            .expect("check"),
        CertVerdict::Expired {
            serial: "0a".into(),
            at_ms: 1_000
        }
    );
    assert_eq!(
        connect(&hooks, &tls(Some(("old-1", &old))), "old-1", None)
            .await
            .err(),
        Some(ConnectRefusal::NotAuthorized)
    );
    assert_eq!(
        app.registry
            .check_certificate("new-1", &other)
            .await
            .expect("check"),
        CertVerdict::Unknown,
        "another device's certificate"
    );
    assert!(
        connect(&hooks, &tls(Some(("new-1", &fresh))), "new-1", None)
            .await
            .is_ok()
    );

    let revoked = app
        .registry
        .revoke_device(&Access::all(), "new-1", Some("lost"))
        .await
        .expect("revoke");
    assert_eq!(revoked, ["0b"]);
    assert!(matches!(
        app.registry.check_certificate("new-1", &fresh).await.expect("check"),
        CertVerdict::Revoked { ref serial, .. } if serial == "0b"
    ));
    assert_eq!(
        connect(&hooks, &tls(Some(("new-1", &fresh))), "new-1", None)
            .await
            .err(),
        Some(ConnectRefusal::NotAuthorized)
    );
    assert!(
        connect(&hooks, &tls(Some(("other-1", &other))), "other-1", None)
            .await
            .is_ok()
    );
    assert_eq!(
        app.counters()
            .connects_refused_certificate
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    server.shutdown().await;
}

#[tokio::test]
async fn publishes_are_routed_to_telemetry_commands_and_shadow_and_presence_follows_connects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let app = server.app.clone();
    let hooks = ServerHooks::new(&app);
    let pinned = PinnedCert {
        sha256_hex: SHA.to_owned(),
        serial_hex: "01".into(),
        not_after_ms: 4_102_444_800_000,
        issuer: mooring_store::CERT_ISSUER_FLEET.to_owned(),
    };
    app.registry
        .create_device_pinned("lock-1", BTreeMap::new(), pinned)
        .await
        .expect("create");
    let device = Principal::Device {
        id: DeviceId::parse("lock-1").expect("id"),
        tags: BTreeMap::new(),
    };

    hooks.on_connected("lock-1", &device);
    assert!(
        app.registry
            .get_device(&mooring_server::access::Access::all(), "lock-1")
            .await
            .expect("get")
            .online
    );

    // Telemetry on its own topic is stored before the verdict; garbage is refused with 0x99.
    let now = app.now_ms();
    let point = format!(r#"{{"seq": 7, "ts": {now}, "temp": 20.5}}"#);
    let msg = Message::new("devices/lock-1/telemetry", point.into_bytes(), 1, false);
    assert_eq!(
        hooks.on_publish(&device, "lock-1", &msg).await,
        PublishVerdict::Accept
    );
    let latest = app
        .telemetry
        .latest(&mooring_server::access::Access::all(), "lock-1")
        .await
        .expect("latest");
    assert_eq!(latest.get("temp").map(|(ts, _)| *ts), Some(now));
    let bad = Message::new("devices/lock-1/telemetry", &b"{not json"[..], 1, false);
    assert_eq!(
        hooks.on_publish(&device, "lock-1", &bad).await,
        PublishVerdict::Reject(0x99)
    );

    // A command's ack and result, published by the device, move the command.
    let (_, cmd) = app
        .commands
        .create_command(
            &mooring_server::access::Access::all(),
            "lock-1",
            NewCommand {
                name: "unlock".into(),
                params: json!({}),
                ttl_secs: None,
                max_attempts: None,
                idempotency_key: None,
                result_timeout_secs: None,
            },
            None,
        )
        .await
        .expect("command");
    let result = Message::new(
        format!("devices/lock-1/commands/{}/result", cmd.id),
        &br#"{"status":"succeeded","output":{"ok":true}}"#[..],
        1,
        false,
    );
    assert_eq!(
        hooks.on_publish(&device, "lock-1", &result).await,
        PublishVerdict::Accept
    );
    let done = app
        .commands
        .get_command(
            &mooring_server::access::Access::all(),
            "lock-1",
            &cmd.id,
            None,
        )
        .await
        .expect("get");
    assert_eq!(done.state, CommandState::Succeeded, "{done:?}");

    // A reported shadow update is merged; an invalid one is refused.
    let reported = Message::new(
        "devices/lock-1/shadow/reported",
        &br#"{"fw":"1.4.0"}"#[..],
        1,
        false,
    );
    assert_eq!(
        hooks.on_publish(&device, "lock-1", &reported).await,
        PublishVerdict::Accept
    );
    let shadow = app
        .shadows
        .get(&mooring_server::access::Access::all(), "lock-1")
        .await
        .expect("shadow");
    assert_eq!(shadow.reported.get("fw"), Some(&json!("1.4.0")));
    let not_object = Message::new("devices/lock-1/shadow/reported", &b"[1]"[..], 1, false);
    assert_eq!(
        hooks.on_publish(&device, "lock-1", &not_object).await,
        PublishVerdict::Reject(0x99)
    );

    hooks.on_disconnected("lock-1", &device);
    assert!(
        !app.registry
            .get_device(&mooring_server::access::Access::all(), "lock-1")
            .await
            .expect("get")
            .online
    );
    drop(app);
    server.shutdown().await;
}
