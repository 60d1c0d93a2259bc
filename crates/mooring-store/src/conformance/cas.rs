//! Conformance cases for [`CaStore`](crate::CaStore): registered manufacturer CAs.

use super::*;
use crate::{cert_issuer_of_ca, CaRecord, CertRecord, CertState, CAS_MAX};

fn ca(id: &str, created_at_ms: u64) -> CaRecord {
    CaRecord {
        id: id.to_owned(),
        subject: format!("CN={id} Manufacturing CA, O=Acme"),
        cert_pem: format!("-----BEGIN CERTIFICATE-----\n{id}\n-----END CERTIFICATE-----\n"),
        sha256: format!("sha-{id}"),
        auto_register: true,
        tags: tags(&[("vendor", "acme")]),
        enabled: true,
        created_at_ms,
        created_by: "token admin".to_owned(),
    }
}

fn jitp_cert(device: &str, ca_id: &str) -> CertRecord {
    CertRecord {
        serial: format!("serial-{device}"),
        device_id: id(device),
        sha256: format!("sha-{device}"),
        not_before_ms: 1_600_000_000_000,
        not_after_ms: 1_800_000_000_000,
        issued_at_ms: 1_700_000_000_000,
        issuer: cert_issuer_of_ca(ca_id),
        state: CertState::Active,
        revoked_at_ms: None,
        revoke_reason: None,
    }
}

pub async fn ca_add_get_list_and_enable_round_trip<S: Store + ?Sized>(store: &S) {
    assert_eq!(store.list_cas().await.expect("list"), vec![]);
    store.add_ca(ca("ca_b", 2_000)).await.expect("add b");
    store.add_ca(ca("ca_a", 2_000)).await.expect("add a");
    store.add_ca(ca("ca_c", 1_000)).await.expect("add c");
    assert_eq!(
        store.get_ca("ca_b").await.expect("get"),
        Some(ca("ca_b", 2_000))
    );
    assert_eq!(store.get_ca("ca_x").await.expect("get"), None);
    let ids: Vec<String> = store
        .list_cas()
        .await
        .expect("list")
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, ["ca_c", "ca_a", "ca_b"], "oldest first, ties by id");
    assert!(store.set_ca_enabled("ca_a", false).await.expect("disable"));
    assert!(!store.get_ca("ca_a").await.expect("get").expect("a").enabled);
    assert!(store.set_ca_enabled("ca_a", false).await.expect("again"));
    assert!(store.set_ca_enabled("ca_a", true).await.expect("enable"));
    assert!(store.get_ca("ca_a").await.expect("get").expect("a").enabled);
    assert!(!store.set_ca_enabled("ca_x", false).await.expect("unknown"));
}

pub async fn ca_taken_fingerprint_or_id_is_refused<S: Store + ?Sized>(store: &S) {
    store.add_ca(ca("ca_a", 1_000)).await.expect("add");
    let mut same_cert = ca("ca_b", 1_000);
    same_cert.sha256 = "sha-ca_a".into();
    let err = store.add_ca(same_cert).await.expect_err("taken sha");
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    let mut same_id = ca("ca_a", 1_000);
    same_id.sha256 = "sha-other".into();
    let err = store.add_ca(same_id).await.expect_err("taken id");
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    assert_eq!(
        store.list_cas().await.expect("list"),
        vec![ca("ca_a", 1_000)]
    );
}

pub async fn ca_count_is_bounded<S: Store + ?Sized>(store: &S) {
    for i in 0..CAS_MAX {
        store
            .add_ca(ca(&format!("ca_{i:03}"), 1_000))
            .await
            .expect("add");
    }
    let err = store
        .add_ca(ca("ca_over", 1_000))
        .await
        .expect_err("over the bound");
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
    assert_eq!(store.get_ca("ca_over").await.expect("get"), None);
    assert_eq!(store.list_cas().await.expect("list").len(), CAS_MAX);
}

pub async fn device_with_cert_is_created_whole_or_not_at_all<S: Store + ?Sized>(store: &S) {
    let cert = jitp_cert("d1", "ca_a");
    let record = store
        .create_device_with_cert(new_device("d1"), cert.clone())
        .await
        .expect("create");
    assert_eq!(record.id.as_str(), "d1");
    assert_eq!(
        store.find_cert_by_sha256("sha-d1").await.expect("find"),
        Some(cert.clone()),
        "the ledger row is the one given, issuer and times included"
    );
    assert_eq!(
        store.list_device_certs("d1", 10).await.expect("list"),
        vec![cert.clone()]
    );
    // The same device again (a concurrent first connection): refused, nothing changed.
    let err = store
        .create_device_with_cert(new_device("d1"), cert.clone())
        .await
        .expect_err("taken id");
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    assert_eq!(
        store.list_device_certs("d1", 10).await.expect("list"),
        vec![cert]
    );
    // Another device with a taken certificate: no device either.
    let mut taken = jitp_cert("d2", "ca_a");
    taken.sha256 = "sha-d1".into();
    let err = store
        .create_device_with_cert(new_device("d2"), taken)
        .await
        .expect_err("taken sha");
    assert!(matches!(err, StoreError::AlreadyExists(_)), "{err:?}");
    assert_eq!(store.get_device("d2").await.expect("get"), None);
    // A ledger row of another device is refused.
    let err = store
        .create_device_with_cert(new_device("d3"), jitp_cert("d4", "ca_a"))
        .await
        .expect_err("mismatch");
    assert!(matches!(err, StoreError::InvalidInput(_)), "{err:?}");
    assert_eq!(store.get_device("d3").await.expect("get"), None);
}
