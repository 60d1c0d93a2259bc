//! Conformance cases for [`CertStore`](crate::CertStore): the certificate ledger.

use super::*;
use crate::{CertRecord, CertRenewal, CertState, CERT_ISSUER_FLEET};

fn cert(device: &str, serial: &str, not_after_ms: u64) -> CertRecord {
    CertRecord {
        serial: serial.to_owned(),
        device_id: id(device),
        sha256: format!("sha-{serial}"),
        not_before_ms: 1_700_000_000_000,
        not_after_ms,
        issued_at_ms: 1_700_000_000_000 + not_after_ms % 1000,
        issuer: CERT_ISSUER_FLEET.to_owned(),
        state: CertState::Active,
        revoked_at_ms: None,
        revoke_reason: None,
    }
}

pub async fn cert_created_with_its_device_and_deleted_with_it<S: Store + ?Sized>(store: &S) {
    store.create_device(new_device("d1")).await.expect("create");
    let expected = CertRecord::of_new_device(&new_device("d1"));
    assert_eq!(
        store.get_cert("serial-d1").await.expect("get"),
        Some(expected.clone())
    );
    assert_eq!(
        store.find_cert_by_sha256("sha-d1").await.expect("find"),
        Some(expected.clone())
    );
    assert_eq!(
        store.list_device_certs("d1", 10).await.expect("list"),
        vec![expected]
    );
    assert!(store.delete_device("d1").await.expect("delete"));
    assert_eq!(store.get_cert("serial-d1").await.expect("get"), None);
    assert_eq!(
        store.find_cert_by_sha256("sha-d1").await.expect("find"),
        None
    );
    // Created again, the device gets its certificate row again.
    store.create_device(new_device("d1")).await.expect("again");
    assert!(store.get_cert("serial-d1").await.expect("get").is_some());
}

pub async fn cert_taken_by_another_device_fails_the_whole_creation<S: Store + ?Sized>(store: &S) {
    store.create_device(new_device("d1")).await.expect("create");
    let mut same_cert = new_device("d2");
    same_cert.cert_sha256 = "sha-d1".into();
    let err = store.create_device(same_cert).await.expect_err("taken sha");
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    assert_eq!(
        store.get_device("d2").await.expect("get"),
        None,
        "nothing of the device is stored"
    );
    let mut same_serial = new_device("d3");
    same_serial.cert_serial = "serial-d1".into();
    let err = store
        .create_device(same_serial)
        .await
        .expect_err("taken serial");
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    assert_eq!(store.get_device("d3").await.expect("get"), None);
}

pub async fn cert_add_lists_newest_first_and_refuses_taken_or_orphan<S: Store + ?Sized>(store: &S) {
    store.create_device(new_device("d1")).await.expect("create");
    store.create_device(new_device("d2")).await.expect("create");
    let second = cert("d1", "0b", 1_900_000_000_500);
    store.add_cert(second.clone()).await.expect("add");
    let listed = store.list_device_certs("d1", 10).await.expect("list");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0], second, "newest issued first");
    assert_eq!(listed[1].serial, "serial-d1");
    assert_eq!(
        store.list_device_certs("d1", 1).await.expect("list").len(),
        1
    );
    assert!(store
        .list_device_certs("d1", 0)
        .await
        .expect("list")
        .is_empty());
    assert_eq!(
        store.list_device_certs("d2", 10).await.expect("list").len(),
        1
    );

    let err = store
        .add_cert(cert("d2", "0b", 1))
        .await
        .expect_err("serial taken");
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    let mut sha_taken = cert("d2", "0c", 1);
    sha_taken.sha256 = "sha-0b".into();
    let err = store.add_cert(sha_taken).await.expect_err("sha taken");
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    let err = store
        .add_cert(cert("nope", "0d", 1))
        .await
        .expect_err("no device");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
    assert_eq!(store.get_cert("0d").await.expect("get"), None);
    let mut nul = cert("d2", "0e", 1);
    nul.issuer = "ca:\0".into();
    let err = store.add_cert(nul).await.expect_err("nul");
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
}

pub async fn cert_revoke_is_idempotent_and_per_device_revokes_only_active<S: Store + ?Sized>(
    store: &S,
) {
    store.create_device(new_device("d1")).await.expect("create");
    store.create_device(new_device("d2")).await.expect("create");
    store
        .add_cert(cert("d1", "0b", 1_900_000_000_000))
        .await
        .expect("add");
    assert!(store
        .revoke_cert("0b", 1_750_000_000_000, Some("lost"))
        .await
        .expect("revoke"));
    assert!(!store
        .revoke_cert("0b", 1_760_000_000_000, Some("again"))
        .await
        .expect("revoke again"));
    assert!(!store
        .revoke_cert("unknown", 1_760_000_000_000, None)
        .await
        .expect("revoke unknown"));
    let revoked = store.get_cert("0b").await.expect("get").expect("present");
    assert_eq!(revoked.state, CertState::Revoked);
    assert_eq!(revoked.revoked_at_ms, Some(1_750_000_000_000));
    assert_eq!(revoked.revoke_reason.as_deref(), Some("lost"));

    let serials = store
        .revoke_device_certs("d1", 1_770_000_000_000, None)
        .await
        .expect("revoke device");
    assert_eq!(serials, ["serial-d1"], "only the active ones");
    let first = store
        .get_cert("serial-d1")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(first.state, CertState::Revoked);
    assert_eq!(first.revoked_at_ms, Some(1_770_000_000_000));
    assert_eq!(first.revoke_reason, None);
    assert!(store
        .revoke_device_certs("d1", 1_780_000_000_000, None)
        .await
        .expect("again")
        .is_empty());
    assert!(store
        .revoke_device_certs("nope", 1_780_000_000_000, None)
        .await
        .expect("unknown device")
        .is_empty());
    let other = store
        .get_cert("serial-d2")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(other.state, CertState::Active, "another device's stays");
    assert_eq!(store.count_revoked_certs().await.expect("count"), 2);
}

pub async fn cert_expiring_lists_active_ones_soonest_first_in_pages<S: Store + ?Sized>(store: &S) {
    for d in ["d1", "d2", "d3"] {
        let mut dev = new_device(d);
        dev.cert_not_after_ms = 5_000;
        store.create_device(dev).await.expect("create");
    }
    // Same expiry on several: ordered by serial after it.
    store.add_cert(cert("d1", "b2", 3_000)).await.expect("add");
    store.add_cert(cert("d2", "b1", 3_000)).await.expect("add");
    store.add_cert(cert("d3", "a9", 4_000)).await.expect("add");
    store.add_cert(cert("d3", "zz", 9_000)).await.expect("add");
    store.add_cert(cert("d3", "r1", 1_000)).await.expect("add");
    assert!(store.revoke_cert("r1", 2, None).await.expect("revoke"));

    let expected = ["b1", "b2", "a9", "serial-d1", "serial-d2", "serial-d3"];
    let all: Vec<String> = store
        .expiring_certs(9_000, 100, None)
        .await
        .expect("list")
        .into_iter()
        .map(|c| c.serial)
        .collect();
    assert_eq!(
        all, expected,
        "active only, not_after < before, soonest first"
    );
    assert_eq!(store.count_expiring_certs(9_000).await.expect("count"), 6);
    assert_eq!(store.count_expiring_certs(3_001).await.expect("count"), 2);
    assert_eq!(store.count_expiring_certs(3_000).await.expect("count"), 0);

    let mut paged = Vec::new();
    let mut after: Option<(u64, String)> = None;
    for _ in 0..10 {
        let page = store
            .expiring_certs(9_000, 4, after.as_ref().map(|(t, s)| (*t, s.as_str())))
            .await
            .expect("page");
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some((last.not_after_ms, last.serial.clone()));
        paged.extend(page.into_iter().map(|c| c.serial));
    }
    assert_eq!(paged, expected);
    assert!(store
        .expiring_certs(9_000, 0, None)
        .await
        .expect("limit 0")
        .is_empty());
    assert_eq!(
        store.count_expiring_certs(u64::MAX).await.expect("count"),
        7
    );
}

pub async fn cert_old_fleet_ones_are_the_active_certs_of_other_fleet_cas_in_pages<
    S: Store + ?Sized,
>(
    store: &S,
) {
    for d in ["d1", "d2"] {
        store.create_device(new_device(d)).await.expect("create");
    }
    let from = |device: &str, serial: &str, not_after_ms: u64, issuer: &str| CertRecord {
        issuer: issuer.to_owned(),
        ..cert(device, serial, not_after_ms)
    };
    let (previous, current) = (
        crate::cert_issuer_of_fleet_ca("aaaa"),
        crate::cert_issuer_of_fleet_ca("bbbb"),
    );
    store
        .add_cert(from("d1", "o2", 7_000, &previous))
        .await
        .expect("add");
    store
        .add_cert(from("d2", "o1", 7_000, &previous))
        .await
        .expect("add");
    store
        .add_cert(from("d2", "o3", 8_000, CERT_ISSUER_FLEET))
        .await
        .expect("add");
    // The current CA's, a revoked one, a registered CA's: not to move.
    store
        .add_cert(from("d1", "n1", 1_000, &current))
        .await
        .expect("add");
    store
        .add_cert(from("d1", "rv", 1_000, &previous))
        .await
        .expect("add");
    assert!(store.revoke_cert("rv", 6, None).await.expect("revoke"));
    store
        .add_cert(from("d2", "jt", 1_000, &crate::cert_issuer_of_ca("ca_x")))
        .await
        .expect("add");

    // new_device's own certificates are `fleet` (issuer unrecorded): moved too.
    let expected = ["o1", "o2", "o3", "serial-d1", "serial-d2"];
    let mut paged = Vec::new();
    let mut after: Option<(u64, String)> = None;
    for _ in 0..10 {
        let page = store
            .old_fleet_certs(
                &current,
                0,
                2,
                after.as_ref().map(|(t, s)| (*t, s.as_str())),
            )
            .await
            .expect("page");
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some((last.not_after_ms, last.serial.clone()));
        paged.extend(page.into_iter().map(|c| c.serial));
    }
    assert_eq!(
        paged, expected,
        "other fleet CAs' active ones, soonest expiry first"
    );
    assert_eq!(
        store
            .count_old_fleet_certs(&current, 0)
            .await
            .expect("count"),
        5
    );
    // From the previous CA's point of view the current one's is the old one.
    assert_eq!(
        store
            .count_old_fleet_certs(&previous, 0)
            .await
            .expect("count"),
        4
    );
    // Expired ones (not_after <= alive_at) are of no device that can still connect.
    assert_eq!(
        store
            .count_old_fleet_certs(&current, 7_000)
            .await
            .expect("count"),
        3
    );
    let alive: Vec<String> = store
        .old_fleet_certs(&current, 7_000, 10, None)
        .await
        .expect("alive")
        .into_iter()
        .map(|c| c.serial)
        .collect();
    assert_eq!(alive, ["o3", "serial-d1", "serial-d2"]);
    assert!(store
        .old_fleet_certs(&current, 0, 0, None)
        .await
        .expect("limit 0")
        .is_empty());
}

pub async fn cert_revoked_since_lists_revocations_oldest_first_in_pages<S: Store + ?Sized>(
    store: &S,
) {
    for d in ["d1", "d2"] {
        store.create_device(new_device(d)).await.expect("create");
    }
    for (device, serial) in [("d1", "a1"), ("d1", "a2"), ("d2", "b1"), ("d2", "b2")] {
        store
            .add_cert(cert(device, serial, 9_000))
            .await
            .expect("add");
    }
    assert!(store.revoke_cert("a2", 100, None).await.expect("revoke"));
    assert!(store.revoke_cert("b1", 100, None).await.expect("revoke"));
    assert!(store.revoke_cert("a1", 50, None).await.expect("revoke"));
    assert!(store.revoke_cert("b2", 200, None).await.expect("revoke"));
    let page = |since, after: Option<(u64, String)>, limit| async move {
        store
            .revoked_certs_since(since, limit, after.as_ref().map(|(t, s)| (*t, s.as_str())))
            .await
            .expect("page")
            .into_iter()
            .map(|c| (c.revoked_at_ms.expect("at"), c.serial))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        page(100, None, 10).await,
        [
            (100, "a2".to_owned()),
            (100, "b1".to_owned()),
            (200, "b2".to_owned())
        ],
        "since inclusive, oldest first, then by serial; active ones never"
    );
    let first = page(0, None, 2).await;
    assert_eq!(first, [(50, "a1".to_owned()), (100, "a2".to_owned())]);
    let next = page(0, first.last().cloned(), 2).await;
    assert_eq!(next, [(100, "b1".to_owned()), (200, "b2".to_owned())]);
    assert!(page(201, None, 10).await.is_empty());
    assert!(page(0, None, 0).await.is_empty());
}

fn renewal(device: &str, key: &str, serial: &str, at_ms: u64) -> CertRenewal {
    CertRenewal {
        device_id: id(device),
        key_sha256: key.to_owned(),
        serial: serial.to_owned(),
        cert_pem: format!("pem-{serial}"),
        requested_at_ms: at_ms,
    }
}

pub async fn cert_renewal_is_one_pending_per_device_and_confirmation_revokes_the_others<
    S: Store + ?Sized,
>(
    store: &S,
) {
    let t = 1_700_000_100_000;
    // No device: nothing stored.
    let orphan = store
        .put_renewal(
            renewal("d9", "k", "r9", t),
            cert("d9", "r9", 1_900_000_000_000),
            "replaced",
        )
        .await;
    assert!(matches!(orphan, Err(StoreError::NotFound(_))), "{orphan:?}");
    assert_eq!(store.get_cert("r9").await.expect("get"), None);

    store.create_device(new_device("d1")).await.expect("create");
    store.create_device(new_device("d2")).await.expect("create");
    assert_eq!(store.get_renewal("d1").await.expect("get"), None);
    let first = store
        .put_renewal(
            renewal("d1", "k1", "r1", t),
            cert("d1", "r1", 1_900_000_000_000),
            "replaced",
        )
        .await
        .expect("put");
    assert_eq!(first, None);
    assert_eq!(
        store.get_renewal("d1").await.expect("get"),
        Some(renewal("d1", "k1", "r1", t))
    );
    assert_eq!(
        store.get_cert("r1").await.expect("get").map(|c| c.state),
        Some(CertState::Active)
    );
    // Another key replaces (revokes) the unconfirmed certificate.
    let replaced = store
        .put_renewal(
            renewal("d1", "k2", "r2", t + 1),
            cert("d1", "r2", 1_900_000_000_000),
            "replaced",
        )
        .await
        .expect("put");
    assert_eq!(replaced.as_deref(), Some("r1"));
    let r1 = store.get_cert("r1").await.expect("get").expect("r1");
    assert_eq!(r1.state, CertState::Revoked);
    assert_eq!(r1.revoke_reason.as_deref(), Some("replaced"));
    assert_eq!(r1.revoked_at_ms, Some(t + 1));
    assert_eq!(
        store.get_renewal("d1").await.expect("get"),
        Some(renewal("d1", "k2", "r2", t + 1))
    );
    // A taken serial: nothing changes.
    let taken = store
        .put_renewal(
            renewal("d1", "k3", "r2", t + 2),
            cert("d1", "r2", 1_900_000_000_000),
            "replaced",
        )
        .await;
    assert!(
        matches!(taken, Err(StoreError::AlreadyExists(_))),
        "{taken:?}"
    );
    assert_eq!(
        store.get_renewal("d1").await.expect("get"),
        Some(renewal("d1", "k2", "r2", t + 1))
    );
    // Confirming anything but the pending renewal does nothing.
    assert_eq!(
        store
            .confirm_renewal("d1", "r1", t + 3, "rotated")
            .await
            .expect("confirm"),
        None
    );
    assert_eq!(
        store
            .confirm_renewal("d2", "r2", t + 3, "rotated")
            .await
            .expect("confirm"),
        None
    );
    // Confirmation: current certificate updated, the others revoked, the renewal gone.
    let revoked = store
        .confirm_renewal("d1", "r2", t + 4, "rotated")
        .await
        .expect("confirm");
    assert_eq!(revoked, Some(vec!["serial-d1".to_owned()]));
    let d1 = store.get_device("d1").await.expect("get").expect("d1");
    assert_eq!(d1.cert_serial, "r2");
    assert_eq!(d1.cert_sha256, "sha-r2");
    assert_eq!(d1.cert_not_after_ms, 1_900_000_000_000);
    let old = store
        .get_cert("serial-d1")
        .await
        .expect("get")
        .expect("old");
    assert_eq!(old.state, CertState::Revoked);
    assert_eq!(old.revoke_reason.as_deref(), Some("rotated"));
    assert_eq!(old.revoked_at_ms, Some(t + 4));
    assert_eq!(
        store.get_cert("r2").await.expect("get").map(|c| c.state),
        Some(CertState::Active)
    );
    assert_eq!(store.get_renewal("d1").await.expect("get"), None);
    // Confirming twice: nothing more.
    assert_eq!(
        store
            .confirm_renewal("d1", "r2", t + 5, "rotated")
            .await
            .expect("confirm"),
        None
    );
    // The other device is untouched; a renewal goes with its device.
    assert_eq!(
        store
            .get_cert("serial-d2")
            .await
            .expect("get")
            .map(|c| c.state),
        Some(CertState::Active)
    );
    store
        .put_renewal(
            renewal("d2", "k", "r3", t),
            cert("d2", "r3", 1_900_000_000_000),
            "replaced",
        )
        .await
        .expect("put");
    assert!(store.delete_device("d2").await.expect("delete"));
    assert_eq!(store.get_renewal("d2").await.expect("get"), None);
    store
        .create_device(new_device("d2"))
        .await
        .expect("create again");
    assert_eq!(store.get_renewal("d2").await.expect("get"), None);
}
