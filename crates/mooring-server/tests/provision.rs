//! The provisioning service in-process (issue 16): claims expire on the server's clock, failed
//! enrollments are throttled per address, concurrent enrollments of a single-use claim have one
//! winner, and a half-done enrollment (reserved, device not created: a crash in between) is
//! finished by the retry, or released if its device id was taken meanwhile. Dead claims are
//! pruned after a week.

use std::collections::BTreeMap;
use std::sync::Arc;

use mooring_proto::ManualClock;
use mooring_server::access::Access;
use mooring_server::provision::NewClaim;
use mooring_server::registry::PinnedCert;
use mooring_server::{Listeners, RunningServer, ServerConfig};
use mooring_store::{ClaimStore, EnrollmentRecord, EnrollmentReserve, SqliteStore};
use sha2::Digest;

const T0: u64 = 1_900_000_000_000;

async fn start(dir: &std::path::Path, clock: Arc<ManualClock>) -> RunningServer {
    let mut config = ServerConfig {
        data_dir: dir.to_owned(),
        mqtt_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        ..ServerConfig::default()
    };
    config.provisioning.enroll_failures_per_address_max = 3;
    let listeners = Listeners::bind(&config).await.expect("bind");
    RunningServer::start(config, listeners, clock)
        .await
        .expect("start")
}

/// A new key's CSR (PEM) and the SHA-256 of its SubjectPublicKeyInfo.
fn csr() -> (String, String) {
    use rcgen::PublicKeyData;
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let spki = hex::encode(sha2::Sha256::digest(key.subject_public_key_info()));
    (csr, spki)
}

async fn claim(server: &RunningServer, uses_max: u32, ttl_ms: u64) -> (String, String) {
    let (c, token) = server
        .app
        .provisioning
        .create_claim(
            &Access::all(),
            "test-harness",
            NewClaim {
                uses_max: Some(uses_max),
                ttl_ms: Some(ttl_ms),
                tags: BTreeMap::from([("site".to_owned(), "lab".to_owned())]),
                ..NewClaim::default()
            },
        )
        .await
        .expect("claim");
    (c.id, token)
}

#[tokio::test]
async fn expired_claims_are_invalid_and_failed_enrollments_are_throttled_per_address() {
    let dir = tempfile::tempdir().expect("tmp");
    let clock = Arc::new(ManualClock::new(T0));
    let server = start(dir.path(), clock.clone()).await;
    let p = &server.app.provisioning;
    let (_, token) = claim(&server, 1, 60_000).await;
    let (pem, _) = csr();

    clock.advance_ms(60_000);
    let e = p
        .enroll(&token, &pem, Some("sn-1"), "10.0.0.1")
        .await
        .expect_err("expired");
    assert_eq!(e.code, "claim_invalid");
    for _ in 0..2 {
        let e = p
            .enroll("mct_unknown", &pem, Some("sn-1"), "10.0.0.1")
            .await
            .expect_err("unknown");
        assert_eq!(e.code, "claim_invalid");
    }
    // Three failures from this address: the next attempt is refused before any lookup.
    let e = p
        .enroll(&token, &pem, Some("sn-1"), "10.0.0.1")
        .await
        .expect_err("throttled");
    assert_eq!((e.code, e.kind.http_status()), ("too_many_attempts", 429));
    // Another address is not.
    let e = p
        .enroll(&token, &pem, Some("sn-1"), "10.0.0.2")
        .await
        .expect_err("expired");
    assert_eq!(e.code, "claim_invalid");
    // And a bound on the ttl: at most 365 days.
    let e = p
        .create_claim(
            &Access::all(),
            "test-harness",
            NewClaim {
                ttl_ms: Some(366 * 86_400_000),
                ..NewClaim::default()
            },
        )
        .await
        .expect_err("too long");
    assert_eq!(e.code, "invalid_ttl");

    // Seven days after it expired, the claim is pruned (with the devices it enrolled listed).
    let (claim_id, _) = claim(&server, 1, 60_000).await;
    clock.advance_ms(60_000 + mooring_server::provision::CLAIM_KEEP_DEAD_MS - 1);
    server.app.provisioning.prune().await.expect("prune");
    assert!(p.get_claim(&Access::all(), &claim_id).await.is_ok());
    clock.advance_ms(2);
    assert!(server.app.provisioning.prune().await.expect("prune") >= 1);
    let e = p
        .get_claim(&Access::all(), &claim_id)
        .await
        .expect_err("pruned");
    assert_eq!(e.code, "claim_not_found");
    server.shutdown().await;
}

#[tokio::test]
async fn concurrent_enrollments_of_a_single_use_claim_have_exactly_one_winner() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = start(dir.path(), Arc::new(ManualClock::new(T0))).await;
    let (claim_id, token) = claim(&server, 1, 3_600_000).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let app = server.app.clone();
        let token = token.clone();
        tasks.spawn(async move {
            let (pem, _) = csr();
            app.provisioning
                .enroll(&token, &pem, Some(&format!("race-{i}")), "10.0.0.1")
                .await
        });
    }
    let mut won = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r.expect("task") {
            Ok(e) => won.push(e.device_id),
            Err(e) => assert_eq!(e.code, "claim_used", "{e}"),
        }
    }
    assert_eq!(won.len(), 1, "{won:?}");
    let (c, devices) = server
        .app
        .provisioning
        .get_claim(&Access::all(), &claim_id)
        .await
        .expect("claim");
    assert_eq!((c.uses, devices), (1, won.clone()));
    for i in 0..8 {
        let id = format!("race-{i}");
        let exists = server
            .app
            .registry
            .lookup(&id)
            .await
            .expect("lookup")
            .is_some();
        assert_eq!(exists, won.contains(&id), "{id}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_half_done_enrollment_is_finished_by_the_retry_or_released_if_its_id_was_taken() {
    let dir = tempfile::tempdir().expect("tmp");
    let server = start(dir.path(), Arc::new(ManualClock::new(T0))).await;
    let (claim_id, token) = claim(&server, 5, 3_600_000).await;
    // What a crash between the reservation and the device leaves: an enrollment and its use.
    let store = SqliteStore::open(dir.path()).expect("second connection");
    let reserve = |device: &str, key: &str| EnrollmentRecord {
        claim_id: claim_id.clone(),
        key_sha256: key.to_owned(),
        device_id: device.to_owned(),
        cert_serial: "0102".to_owned(),
        cert_sha256: format!("{:0>64}", device.len()),
        cert_not_after_ms: T0 + 86_400_000,
        cert_pem: format!("certificate of {device}"),
        created_at_ms: T0,
    };
    let (pem, key) = csr();
    assert_eq!(
        store
            .reserve_enrollment(reserve("half-1", &key), T0)
            .await
            .expect("reserve"),
        EnrollmentReserve::Reserved
    );
    let done = server
        .app
        .provisioning
        .enroll(&token, &pem, Some("ignored"), "10.0.0.1")
        .await
        .expect("finished");
    assert_eq!(
        (
            done.device_id.as_str(),
            done.certificate_pem.as_str(),
            done.created
        ),
        ("half-1", "certificate of half-1", true)
    );
    let device = server
        .app
        .registry
        .lookup("half-1")
        .await
        .expect("lookup")
        .expect("created");
    assert_eq!(device.tags.get("site").map(String::as_str), Some("lab"));

    // Reserved for race-1, but race-1 was created by someone else meanwhile: released.
    let (pem, key) = csr();
    store
        .reserve_enrollment(reserve("race-1", &key), T0)
        .await
        .expect("reserve");
    server
        .app
        .registry
        .create_device_pinned(
            "race-1",
            BTreeMap::new(),
            PinnedCert {
                sha256_hex: "f".repeat(64),
                serial_hex: "03".to_owned(),
                not_after_ms: T0 + 86_400_000,
                issuer: mooring_store::CERT_ISSUER_FLEET.to_owned(),
            },
        )
        .await
        .expect("other device");
    let e = server
        .app
        .provisioning
        .enroll(&token, &pem, None, "10.0.0.1")
        .await
        .expect_err("taken");
    assert_eq!(e.code, "device_exists");
    assert_eq!(
        store.get_enrollment(&claim_id, &key).await.expect("get"),
        None
    );
    let (c, devices) = server
        .app
        .provisioning
        .get_claim(&Access::all(), &claim_id)
        .await
        .expect("claim");
    assert_eq!((c.uses, devices), (1, vec!["half-1".to_owned()]));
    // The same key may enroll again under another id.
    let again = server
        .app
        .provisioning
        .enroll(&token, &pem, Some("race-2"), "10.0.0.1")
        .await
        .expect("enrolled");
    assert_eq!(again.device_id, "race-2");
    server.shutdown().await;
}
