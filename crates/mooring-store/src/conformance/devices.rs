//! Conformance cases for [`DeviceStore`](crate::DeviceStore): create, find, list, tags, last seen, delete.

use super::*;

pub async fn device_create_then_get_round_trips<S: DeviceStore + ?Sized>(store: &S) {
    let created = store.create_device(new_device("d1")).await.expect("create");
    assert_eq!(created, new_device("d1").into_record());
    assert_eq!(created.last_seen_ms, None);
    let got = store.get_device("d1").await.expect("get");
    assert_eq!(got, Some(created));
    assert_eq!(store.get_device("nope").await.expect("get missing"), None);
}

pub async fn device_duplicate_id_is_already_exists<S: DeviceStore + ?Sized>(store: &S) {
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

pub async fn device_find_by_cert_returns_the_owner<S: DeviceStore + ?Sized>(store: &S) {
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

pub async fn device_list_is_ordered_by_id_with_keyset_pagination<S: DeviceStore + ?Sized>(
    store: &S,
) {
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
        .map(|d| d.id.into_string())
        .collect();
    assert_eq!(all, expected);

    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let page = store.list_devices(4, after.as_deref()).await.expect("page");
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some(last.id.to_string());
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

pub async fn device_delete_removes_only_that_device<S: DeviceStore + ?Sized>(store: &S) {
    store
        .create_device(new_device("d1"))
        .await
        .expect("create d1");
    store
        .create_device(new_device("d2"))
        .await
        .expect("create d2");
    assert!(store.delete_device("d1").await.expect("delete"));
    assert_eq!(store.get_device("d1").await.expect("get"), None);
    assert_eq!(
        store.find_device_by_cert("sha-d1").await.expect("find"),
        None
    );
    assert!(!store.delete_device("d1").await.expect("delete again"));
    assert!(!store.delete_device("ghost").await.expect("delete unknown"));
    let left: Vec<DeviceId> = store
        .list_devices(10, None)
        .await
        .expect("list")
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left, [id("d2")], "other devices are untouched");
    // The id is free again.
    store
        .create_device(new_device("d1"))
        .await
        .expect("re-create");
}

pub async fn device_set_tags_replaces_all_and_missing_is_not_found<S: DeviceStore + ?Sized>(
    store: &S,
) {
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

pub async fn device_last_seen_keeps_the_maximum_and_skips_unknown_ids<S: DeviceStore + ?Sized>(
    store: &S,
) {
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
        .record_activity(&[seen("d1", 500), seen("ghost", 9_000)])
        .await
        .expect("record");
    assert_eq!(last_seen("d1").await, Some(500));
    assert_eq!(last_seen("d2").await, None);
    assert_eq!(store.get_device("ghost").await.expect("get"), None);

    // Older values never move it back; within one batch the maximum wins.
    store
        .record_activity(&[seen("d1", 400), seen("d2", 700), seen("d2", 600)])
        .await
        .expect("record older");
    assert_eq!(last_seen("d1").await, Some(500));
    assert_eq!(last_seen("d2").await, Some(700));

    store
        .record_activity(&[seen("d1", 900)])
        .await
        .expect("record newer");
    assert_eq!(last_seen("d1").await, Some(900));
    store.record_activity(&[]).await.expect("empty batch");
}

fn seen(id: &str, at_ms: u64) -> crate::DeviceActivity {
    crate::DeviceActivity {
        id: id.into(),
        last_seen_ms: at_ms,
        connected_at_ms: None,
        telemetry_at_ms: None,
    }
}

/// First connect and first telemetry are set once; last telemetry only moves forward and only
/// with telemetry.
pub async fn device_activity_sets_firsts_once_and_keeps_the_newest_telemetry<
    S: DeviceStore + ?Sized,
>(
    store: &S,
) {
    store.create_device(new_device("d1")).await.expect("create");
    let get = || async { store.get_device("d1").await.expect("get").expect("present") };
    let d = get().await;
    assert_eq!(
        (
            d.first_connect_ms,
            d.first_telemetry_ms,
            d.last_telemetry_ms
        ),
        (None, None, None)
    );
    let act = |seen: u64, connected: Option<u64>, telemetry: Option<u64>| crate::DeviceActivity {
        id: "d1".into(),
        last_seen_ms: seen,
        connected_at_ms: connected,
        telemetry_at_ms: telemetry,
    };
    store
        .record_activity(&[act(100, Some(90), None)])
        .await
        .expect("connect");
    let d = get().await;
    assert_eq!(d.first_connect_ms, Some(90));
    assert_eq!(d.first_telemetry_ms, None);
    store
        .record_activity(&[act(300, Some(250), Some(300)), act(200, None, Some(200))])
        .await
        .expect("telemetry");
    let d = get().await;
    assert_eq!(d.first_connect_ms, Some(90), "first connect never moves");
    assert_eq!(d.last_seen_ms, Some(300));
    assert_eq!(d.last_telemetry_ms, Some(300));
    assert!(matches!(d.first_telemetry_ms, Some(200 | 300)));
    let first_telemetry = d.first_telemetry_ms;
    store
        .record_activity(&[act(400, None, None), act(350, None, Some(250))])
        .await
        .expect("older telemetry");
    let d = get().await;
    assert_eq!(d.last_telemetry_ms, Some(300), "never moves back");
    assert_eq!(d.first_telemetry_ms, first_telemetry);
    assert_eq!(d.last_seen_ms, Some(400));
}

/// An installation and step errors are kept with the device (and go with it).
pub async fn device_installation_and_step_errors_round_trip<S: DeviceStore + ?Sized>(store: &S) {
    store.create_device(new_device("d1")).await.expect("create");
    let inst = crate::Installation {
        at_ms: 1_000,
        by: "ann@example.com".into(),
        location: "Hall 3, door 2".into(),
        notes: "café \"quotes\"".into(),
    };
    assert!(store
        .set_installation("d1", inst.clone())
        .await
        .expect("set"));
    assert!(!store
        .set_installation("ghost", inst.clone())
        .await
        .expect("ghost"));
    let err = |at_ms: u64, m: &str| crate::StepError {
        at_ms,
        message: m.into(),
    };
    store
        .record_step_error("d1", "first_connect", err(5, "certificate revoked"))
        .await
        .expect("error");
    store
        .record_step_error("d1", "first_connect", err(6, "certificate \"expired\""))
        .await
        .expect("error replaced");
    let long = "é".repeat(crate::STEP_ERROR_LEN_MAX);
    store
        .record_step_error("d1", "claimed", err(7, &long))
        .await
        .expect("long error");
    store
        .record_step_error("ghost", "claimed", err(7, "x"))
        .await
        .expect("unknown ids are skipped");
    let d = store.get_device("d1").await.expect("get").expect("present");
    assert_eq!(d.installation, Some(inst));
    assert_eq!(d.provisioning_errors.len(), 2);
    assert_eq!(
        d.provisioning_errors.get("first_connect"),
        Some(&err(6, "certificate \"expired\""))
    );
    let claimed = d.provisioning_errors.get("claimed").expect("claimed error");
    assert!(claimed.message.len() <= crate::STEP_ERROR_LEN_MAX);
    assert!(claimed.message.starts_with("é"));
    assert!(store.delete_device("d1").await.expect("delete"));
    store.create_device(new_device("d1")).await.expect("again");
    let d = store.get_device("d1").await.expect("get").expect("present");
    assert_eq!(d.installation, None);
    assert!(d.provisioning_errors.is_empty());
}

/// The funnel counts devices that connected, reported and were installed, within a filter.
pub async fn device_pipeline_counts_follow_activity_and_filters<S: DeviceStore + ?Sized>(
    store: &S,
) {
    let filter = crate::DeviceFilter::default();
    assert_eq!(
        store.count_pipeline(&filter).await.expect("empty"),
        crate::PipelineCounts::default()
    );
    for id in ["a", "b", "c"] {
        store.create_device(new_device(id)).await.expect("create");
    }
    let mut south = new_device("d");
    south.tags = tags(&[("site", "south")]);
    store.create_device(south).await.expect("create d");
    let act = |id: &str, connected: bool, telemetry: bool| crate::DeviceActivity {
        id: id.into(),
        last_seen_ms: 10,
        connected_at_ms: connected.then_some(5),
        telemetry_at_ms: telemetry.then_some(10),
    };
    store
        .record_activity(&[
            act("a", true, true),
            act("b", true, false),
            act("d", true, true),
        ])
        .await
        .expect("activity");
    let inst = crate::Installation {
        at_ms: 20,
        by: "ann".into(),
        location: "x".into(),
        notes: String::new(),
    };
    assert!(store.set_installation("a", inst).await.expect("install"));
    assert_eq!(
        store.count_pipeline(&filter).await.expect("all"),
        crate::PipelineCounts {
            devices: 4,
            connected: 3,
            reporting: 2,
            installed: 1,
        }
    );
    let north = crate::DeviceFilter {
        tags: vec![("site".into(), "north".into())],
        ..crate::DeviceFilter::default()
    };
    assert_eq!(
        store.count_pipeline(&north).await.expect("north"),
        crate::PipelineCounts {
            devices: 3,
            connected: 2,
            reporting: 1,
            installed: 1,
        }
    );
}
