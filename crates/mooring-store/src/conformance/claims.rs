//! Conformance cases for [`ClaimStore`](crate::ClaimStore): round trip, the live-claim bounds,
//! revocation, and enrollment reservations (uses taken once, idempotent per key, released,
//! exactly one winner of concurrent reservations for the last use).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{
    ClaimCreate, ClaimRecord, ClaimStore, EnrollmentRecord, EnrollmentReserve, Store, StoreError,
};

const T0: u64 = 1_700_000_000_000;
const DAY_MS: u64 = 86_400_000;

fn claim(n: u32, created_by: &str, uses_max: u32) -> ClaimRecord {
    ClaimRecord {
        id: format!("clm_{n:04}"),
        token_sha256: format!("{n:064x}"),
        name: Some(format!("batch {n}")),
        uses_max,
        uses: 0,
        tags: BTreeMap::from([("site".to_owned(), "berlin".to_owned())]),
        assign_ids: n.is_multiple_of(2),
        expires_at_ms: T0 + DAY_MS,
        created_by: created_by.to_owned(),
        created_at_ms: T0,
        revoked_at_ms: None,
    }
}

fn enrollment(claim_id: &str, key: u32, device: &str) -> EnrollmentRecord {
    EnrollmentRecord {
        claim_id: claim_id.to_owned(),
        key_sha256: format!("{key:064x}"),
        device_id: device.to_owned(),
        cert_serial: format!("{key:032x}"),
        cert_sha256: format!("{:064x}", key + 1),
        cert_not_after_ms: T0 + 365 * DAY_MS,
        cert_pem: format!("-----BEGIN CERTIFICATE-----\n{key}\n-----END CERTIFICATE-----\n"),
        created_at_ms: T0 + u64::from(key),
    }
}

async fn create<S: ClaimStore + ?Sized>(store: &S, c: ClaimRecord) {
    assert_eq!(
        store.create_claim(c, T0, 100, 1000).await.expect("create"),
        ClaimCreate::Created
    );
}

/// Create, get and find back field for field; list by id with a cursor; a taken id or token
/// hash is `AlreadyExists`; revoke keeps its first time and answers the claim as stored.
pub async fn claim_create_get_find_list_revoke_round_trip<S: ClaimStore + ?Sized>(store: &S) {
    let c1 = claim(1, "tok_a", 1);
    let mut c2 = claim(2, "tok_a", 5);
    c2.name = None;
    c2.tags = BTreeMap::new();
    create(store, c1.clone()).await;
    create(store, c2.clone()).await;
    assert_eq!(
        store.get_claim("clm_0001").await.expect("get"),
        Some(c1.clone())
    );
    assert_eq!(
        store.find_claim(&c2.token_sha256).await.expect("find"),
        Some(c2.clone())
    );
    assert_eq!(store.get_claim("clm_9999").await.expect("get"), None);
    assert_eq!(store.find_claim(&"f".repeat(64)).await.expect("find"), None);

    let mut same_id = claim(1, "tok_a", 1);
    same_id.token_sha256 = "e".repeat(64);
    assert!(matches!(
        store.create_claim(same_id, T0, 100, 1000).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let mut same_hash = claim(3, "tok_a", 1);
    same_hash.token_sha256 = c1.token_sha256.clone();
    assert!(matches!(
        store.create_claim(same_hash, T0, 100, 1000).await,
        Err(StoreError::AlreadyExists(_))
    ));

    let all = store.list_claims(10, None).await.expect("list");
    assert_eq!(all, vec![c1.clone(), c2.clone()]);
    let rest = store.list_claims(10, Some("clm_0001")).await.expect("list");
    assert_eq!(rest, vec![c2.clone()]);
    assert_eq!(store.list_claims(1, None).await.expect("list").len(), 1);

    let revoked = store
        .revoke_claim("clm_0001", T0 + 5)
        .await
        .expect("revoke")
        .expect("exists");
    assert_eq!(revoked.revoked_at_ms, Some(T0 + 5));
    let again = store
        .revoke_claim("clm_0001", T0 + 9)
        .await
        .expect("revoke")
        .expect("exists");
    assert_eq!(again.revoked_at_ms, Some(T0 + 5), "the first time stays");
    assert!(!again.is_live(T0 + 6));
    assert_eq!(
        store.revoke_claim("clm_9999", T0).await.expect("revoke"),
        None
    );
}

/// At most `per_creator_max` live claims per creator and `total_max` in all; revoked and expired
/// claims do not count; a refused claim is not stored.
pub async fn claim_live_bounds_per_creator_and_in_total<S: ClaimStore + ?Sized>(store: &S) {
    for n in 0..2 {
        assert_eq!(
            store
                .create_claim(claim(n, "tok_a", 1), T0, 2, 3)
                .await
                .expect("create"),
            ClaimCreate::Created
        );
    }
    assert_eq!(
        store
            .create_claim(claim(10, "tok_a", 1), T0, 2, 3)
            .await
            .expect("create"),
        ClaimCreate::CreatorFull
    );
    assert_eq!(store.get_claim("clm_0010").await.expect("get"), None);
    assert_eq!(
        store
            .create_claim(claim(11, "tok_b", 1), T0, 2, 3)
            .await
            .expect("create"),
        ClaimCreate::Created
    );
    assert_eq!(
        store
            .create_claim(claim(12, "tok_c", 1), T0, 2, 3)
            .await
            .expect("create"),
        ClaimCreate::TotalFull
    );
    // A revoked claim frees its place.
    store.revoke_claim("clm_0000", T0).await.expect("revoke");
    assert_eq!(
        store
            .create_claim(claim(13, "tok_a", 1), T0, 2, 3)
            .await
            .expect("create"),
        ClaimCreate::Created
    );
    // Once they expire, none counts.
    let later = T0 + DAY_MS;
    for n in 20..22 {
        assert_eq!(
            store
                .create_claim(claim(n, "tok_a", 1), later, 2, 3)
                .await
                .expect("create"),
            ClaimCreate::Created
        );
    }
}

/// A reservation takes one use and stores the enrollment; the same key again answers the
/// stored one and takes nothing; a new key past `uses_max` is `Exhausted`; an unknown, revoked or
/// expired claim is `ClaimInvalid`; a release gives the use back and forgets the key.
pub async fn enrollment_reservations_take_uses_once_per_key<S: ClaimStore + ?Sized>(store: &S) {
    create(store, claim(1, "tok_a", 2)).await;
    let e1 = enrollment("clm_0001", 1, "sn-1");
    assert_eq!(
        store
            .reserve_enrollment(e1.clone(), T0)
            .await
            .expect("reserve"),
        EnrollmentReserve::Reserved
    );
    assert_eq!(
        store
            .get_enrollment("clm_0001", &e1.key_sha256)
            .await
            .expect("get"),
        Some(e1.clone())
    );
    let mut retry = enrollment("clm_0001", 1, "sn-other");
    retry.cert_pem = "another".to_owned();
    assert_eq!(
        store.reserve_enrollment(retry, T0).await.expect("reserve"),
        EnrollmentReserve::Existing(e1.clone())
    );
    let uses = |c: Option<ClaimRecord>| c.expect("claim").uses;
    assert_eq!(uses(store.get_claim("clm_0001").await.expect("get")), 1);

    let e2 = enrollment("clm_0001", 2, "sn-2");
    assert_eq!(
        store
            .reserve_enrollment(e2.clone(), T0)
            .await
            .expect("reserve"),
        EnrollmentReserve::Reserved
    );
    assert_eq!(
        store
            .reserve_enrollment(enrollment("clm_0001", 3, "sn-3"), T0)
            .await
            .expect("reserve"),
        EnrollmentReserve::Exhausted
    );
    assert_eq!(uses(store.get_claim("clm_0001").await.expect("get")), 2);
    assert_eq!(
        store.list_enrollments("clm_0001", 10).await.expect("list"),
        vec![e1.clone(), e2.clone()]
    );

    assert!(store
        .release_enrollment("clm_0001", &e2.key_sha256)
        .await
        .expect("release"));
    assert!(!store
        .release_enrollment("clm_0001", &e2.key_sha256)
        .await
        .expect("release"));
    assert_eq!(uses(store.get_claim("clm_0001").await.expect("get")), 1);
    assert_eq!(
        store
            .reserve_enrollment(enrollment("clm_0001", 3, "sn-3"), T0)
            .await
            .expect("reserve"),
        EnrollmentReserve::Reserved
    );

    assert_eq!(
        store
            .reserve_enrollment(enrollment("clm_9999", 4, "sn-4"), T0)
            .await
            .expect("reserve"),
        EnrollmentReserve::ClaimInvalid
    );
    create(store, claim(2, "tok_a", 5)).await;
    assert_eq!(
        store
            .reserve_enrollment(enrollment("clm_0002", 4, "sn-4"), T0 + DAY_MS)
            .await
            .expect("reserve"),
        EnrollmentReserve::ClaimInvalid,
        "expired"
    );
    store.revoke_claim("clm_0002", T0).await.expect("revoke");
    assert_eq!(
        store
            .reserve_enrollment(enrollment("clm_0002", 4, "sn-4"), T0)
            .await
            .expect("reserve"),
        EnrollmentReserve::ClaimInvalid,
        "revoked"
    );
    assert_eq!(uses(store.get_claim("clm_0002").await.expect("get")), 0);
    assert_eq!(
        store.list_enrollments("clm_0002", 10).await.expect("list"),
        vec![]
    );
}

/// Sixteen reservations of different keys at once for a single-use claim: exactly one wins.
pub async fn concurrent_reservations_of_a_single_use_claim_have_one_winner(store: Arc<dyn Store>) {
    create(&*store, claim(1, "tok_a", 1)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for key in 0..16u32 {
        let store = Arc::clone(&store);
        tasks.spawn(async move {
            store
                .reserve_enrollment(enrollment("clm_0001", key, &format!("sn-{key}")), T0)
                .await
                .expect("reserve")
        });
    }
    let mut reserved = 0;
    while let Some(outcome) = tasks.join_next().await {
        match outcome.expect("task") {
            EnrollmentReserve::Reserved => reserved += 1,
            EnrollmentReserve::Exhausted => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(reserved, 1);
    let c = store
        .get_claim("clm_0001")
        .await
        .expect("get")
        .expect("claim");
    assert_eq!(c.uses, 1);
    assert_eq!(
        store
            .list_enrollments("clm_0001", 20)
            .await
            .expect("list")
            .len(),
        1
    );
}
