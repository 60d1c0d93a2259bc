//! Conformance cases for [`ShadowStore`](crate::ShadowStore): compare-and-set on the version, reads and listing.

use super::*;

pub async fn shadow_save_is_compare_and_set_on_version(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    store.create_device(new_device("d2")).await.expect("device");
    assert!(store.get_shadow("d1").await.expect("get").is_none());
    let obj = |v: serde_json::Value| match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let v1 = ShadowRecord {
        device_id: id("d1"),
        desired: obj(serde_json::json!({"led": "on"})),
        reported: obj(serde_json::json!({"version": "1.4.0"})),
        version: 1,
        updated_at_ms: 1000,
    };
    assert!(store.save_shadow(v1.clone(), 0).await.expect("insert"));
    assert!(!store
        .save_shadow(v1.clone(), 0)
        .await
        .expect("second insert"));
    assert_eq!(store.get_shadow("d1").await.expect("get"), Some(v1.clone()));
    let mut v2 = v1.clone();
    v2.version = 2;
    v2.desired = obj(serde_json::json!({"led": "off"}));
    assert!(!store.save_shadow(v2.clone(), 5).await.expect("stale"));
    assert!(store.save_shadow(v2.clone(), 1).await.expect("update"));
    assert_eq!(store.get_shadow("d1").await.expect("get"), Some(v2.clone()));
    let missing = ShadowRecord {
        version: 1,
        ..ShadowRecord::empty(id("ghost"))
    };
    assert_eq!(
        store
            .save_shadow(missing, 0)
            .await
            .expect_err("no device")
            .kind(),
        "not_found"
    );
    let d2 = ShadowRecord {
        version: 1,
        ..ShadowRecord::empty(id("d2"))
    };
    assert!(store.save_shadow(d2.clone(), 0).await.expect("insert"));
    let got = store
        .get_shadows(&["d2".into(), "ghost".into(), "d1".into()])
        .await
        .expect("get_shadows");
    assert_eq!(got.len(), 2);
    let listed = store.list_shadows(1, None).await.expect("list");
    assert_eq!(listed, vec![v2]);
    let listed = store.list_shadows(10, Some("d1")).await.expect("list");
    assert_eq!(listed, vec![d2]);
}
