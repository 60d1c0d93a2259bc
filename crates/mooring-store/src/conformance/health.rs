//! Conformance cases for [`HealthStore`](crate::HealthStore): deltas fold into one record per
//! device, records go with their device, batches are bounded.

use super::*;
use crate::health::{HealthDelta, HOUR_MS};
use crate::HEALTH_BATCH_LEN_MAX;

const GAP_MS: u64 = 15 * 60 * 1000;

fn connects(device: &str, at_ms: u64, n: u64) -> HealthDelta {
    let mut d = HealthDelta::new(device, at_ms);
    d.count(at_ms, |c| c.connects += n);
    d.telemetry(at_ms, GAP_MS);
    d
}

pub async fn health_deltas_fold_into_one_record_per_device(store: &dyn Store) {
    store
        .create_device(new_device("h-1"))
        .await
        .expect("create");
    store
        .create_device(new_device("h-2"))
        .await
        .expect("create");
    // After the devices were registered (new_device: 1,700,000,000,000), on an hour.
    let at = 472_300 * HOUR_MS;
    let applied = store
        .merge_device_health(
            vec![
                connects("h-2", at, 1),
                connects("h-1", at, 2),
                connects("h-1", at + 1000, 3),
                connects("nobody", at, 1),
            ],
            GAP_MS,
        )
        .await
        .expect("merge");
    assert_eq!(applied, 3, "the unknown device's delta is dropped");
    // A second merge (another node's deltas) adds up; a late telemetry counts a gap.
    store
        .merge_device_health(vec![connects("h-1", at + 2 * HOUR_MS, 1)], GAP_MS)
        .await
        .expect("merge");
    let ids = vec!["h-1".to_owned(), "h-2".to_owned(), "nobody".to_owned()];
    let mut got = store.get_device_health(&ids).await.expect("get");
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got.len(), 2);
    let (id, h1) = &got[0];
    assert_eq!(id, "h-1");
    assert_eq!(h1.totals.connects, 6);
    assert_eq!(h1.totals.telemetry_gaps, 1);
    assert_eq!(h1.since_ms, at);
    assert_eq!(h1.last_telemetry_ms, Some(at + 2 * HOUR_MS));
    assert_eq!(h1.hours.len(), 2);
    assert_eq!(got[1].1.totals.connects, 1);

    // The record goes with its device; a device created again starts with none, and a delta
    // that began before it was registered again is not its own.
    store.delete_device("h-1").await.expect("delete");
    let mut again = new_device("h-1");
    again.created_at_ms = at + 3 * HOUR_MS;
    store.create_device(again).await.expect("create again");
    let old = connects("h-1", at + 2 * HOUR_MS + 1, 5);
    let applied = store.merge_device_health(vec![old], GAP_MS).await;
    assert_eq!(applied.expect("merge"), 0);
    let got = store.get_device_health(&ids).await.expect("get");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "h-2");
}

pub async fn health_batches_are_bounded(store: &dyn Store) {
    let deltas: Vec<HealthDelta> = (0..=HEALTH_BATCH_LEN_MAX)
        .map(|i| connects(&format!("d-{i}"), HOUR_MS, 1))
        .collect();
    let e = store.merge_device_health(deltas, GAP_MS).await;
    assert!(matches!(e, Err(StoreError::InvalidInput(_))), "{e:?}");
    let ids: Vec<String> = (0..=HEALTH_BATCH_LEN_MAX)
        .map(|i| format!("d-{i}"))
        .collect();
    let e = store.get_device_health(&ids).await;
    assert!(matches!(e, Err(StoreError::InvalidInput(_))), "{e:?}");
    assert!(store
        .merge_device_health(Vec::new(), GAP_MS)
        .await
        .is_ok_and(|n| n == 0));
}
