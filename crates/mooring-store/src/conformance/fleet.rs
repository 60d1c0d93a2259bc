//! Conformance cases for [`FleetStore`](crate::FleetStore) (history samples) and the device
//! selections of [`DeviceStore`](crate::DeviceStore) (`select_devices`,
//! `count_device_versions`), which must select exactly what `Selector::matches` does.

use super::*;
use crate::{DeviceFilter, FleetSample, FleetTotals, OnlineFilter, SessionOp};
use mooring_proto::selector::{DeviceFacts, Selector};

fn sample(node: &str, ts_ms: u64, devices: u64, online: u64, points: u64) -> FleetSample {
    FleetSample {
        node_id: node.to_owned(),
        ts_ms,
        devices,
        online,
        points,
        messages: points + 1,
    }
}

pub async fn fleet_samples_sum_per_interval_and_prune_in_chunks(store: &dyn Store) {
    store
        .record_fleet_sample(sample("n1", 60_000, 10, 2, 100))
        .await
        .expect("record");
    store
        .record_fleet_sample(sample("n2", 60_000, 11, 3, 50))
        .await
        .expect("record");
    store
        .record_fleet_sample(sample("n1", 120_000, 10, 1, 7))
        .await
        .expect("record");
    // The same node and interval again replaces the first.
    store
        .record_fleet_sample(sample("n1", 120_000, 12, 4, 8))
        .await
        .expect("replace");
    store
        .record_fleet_sample(sample("n2", 180_000, 12, 0, 0))
        .await
        .expect("record");
    let all = store.fleet_totals(0, u64::MAX, 100).await.expect("totals");
    let t = |ts_ms, devices, online, points, messages| FleetTotals {
        ts_ms,
        devices,
        online,
        points,
        messages,
    };
    assert_eq!(
        all,
        vec![
            t(60_000, 11, 5, 150, 152),
            t(120_000, 12, 4, 8, 9),
            t(180_000, 12, 0, 0, 1)
        ]
    );
    // Window: from inclusive, to exclusive; the limit keeps the newest.
    assert_eq!(
        store
            .fleet_totals(60_001, 180_000, 100)
            .await
            .expect("window"),
        vec![all[1]]
    );
    assert_eq!(
        store.fleet_totals(0, u64::MAX, 2).await.expect("limit"),
        all[1..].to_vec()
    );
    assert!(store
        .fleet_totals(0, 60_000, 100)
        .await
        .expect("empty")
        .is_empty());
    // Pruning removes samples older than the cutoff, at most max_rows at a time.
    assert_eq!(
        store.prune_fleet_samples(120_001, 2).await.expect("prune"),
        2
    );
    assert_eq!(
        store.prune_fleet_samples(120_001, 2).await.expect("prune"),
        1
    );
    assert_eq!(
        store.prune_fleet_samples(120_001, 2).await.expect("prune"),
        0
    );
    assert_eq!(
        store.fleet_totals(0, u64::MAX, 100).await.expect("rest"),
        vec![all[2]]
    );
}

/// A small fleet with tags, reported versions of every JSON kind, and sessions on this node,
/// on another live node and on a dead one.
async fn selection_fleet(
    store: &dyn Store,
) -> (
    Vec<(String, BTreeMap<String, String>, Option<String>)>,
    OnlineFilter,
    Vec<String>,
) {
    let obj = |v: serde_json::Value| match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let mut fleet = Vec::new();
    for i in 0..60u32 {
        let name = format!("d{i:02}");
        let mut t = tags(&[("site", ["berlin", "paris", "oslo"][(i % 3) as usize])]);
        if i % 10 == 0 {
            t.insert("rare".into(), "yes".into());
        }
        if i % 7 == 0 {
            t.insert("site.zone".into(), "a:1".into());
        }
        store
            .create_device(NewDevice {
                tags: t.clone(),
                ..new_device(&name)
            })
            .await
            .expect("device");
        let reported = match i % 6 {
            0 => Some(serde_json::json!({"version": "1.4.0"})),
            1 => Some(serde_json::json!({"version": "1.5.0", "x": 1})),
            2 => Some(serde_json::json!({"version": 2})),
            3 => Some(serde_json::json!({"version": 1.5})),
            4 => Some(serde_json::json!({"version": true})),
            _ => None,
        };
        if let Some(r) = reported {
            let s = ShadowRecord {
                device_id: id(&name),
                desired: serde_json::Map::new(),
                reported: obj(r),
                version: 1,
                updated_at_ms: 1,
            };
            store.save_shadow(s, 0).await.expect("shadow");
        }
        let version = store
            .get_shadow(&name)
            .await
            .expect("get shadow")
            .and_then(|s| s.reported_version());
        fleet.push((name, t, version));
    }
    let now = 1_000_000;
    store.heartbeat("me", now).await.expect("heartbeat");
    store.heartbeat("other", now).await.expect("heartbeat");
    store.heartbeat("dead", 1).await.expect("heartbeat");
    let open = |d: &str, n: &str| SessionOp::Open {
        device_id: d.to_owned(),
        node_id: n.to_owned(),
        since_ms: 5,
    };
    store
        .apply_session_ops(vec![
            open("d01", "other"),
            open("d02", "other"),
            open("d03", "dead"),
            // A row naming the asking node for a device it does not hold (a close not yet
            // written) is not online.
            open("d04", "me"),
        ])
        .await
        .expect("sessions");
    let here: Vec<String> = ["d00", "d10", "d20", "d05"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let online = OnlineFilter {
        here: here.clone(),
        elsewhere: Some(("me".to_owned(), now - 10)),
    };
    let mut online_ids = here;
    online_ids.extend(["d01".to_owned(), "d02".to_owned()]);
    (fleet, online, online_ids)
}

pub async fn device_selection_matches_selector_semantics(store: &dyn Store) {
    let (fleet, online, online_ids) = selection_fleet(store).await;
    let selectors = [
        "",
        "tag:site=berlin",
        "tag:rare=yes",
        "tag:site.zone=a:1",
        "tag:site=berlin and tag:rare=yes",
        "tag:site=nowhere",
        "version=1.4.0",
        "version=2",
        "version=1.5",
        "version=true",
        "version=1.4.0 and version=2",
        "online",
        "online and tag:site=paris",
        "online and version=1.4.0",
        "d01,d02,d03,d59,zz",
        "d01,d02 and id:d02,d03",
        "id:d00,d10,d11 and online",
    ];
    for text in selectors {
        let sel = if text.is_empty() {
            Selector { terms: Vec::new() }
        } else {
            Selector::parse(text).expect("selector")
        };
        let expected: Vec<String> = fleet
            .iter()
            .filter(|(name, t, version)| {
                sel.matches(&DeviceFacts {
                    id: name,
                    tags: t,
                    online: online_ids.contains(name),
                    version: version.as_deref(),
                })
            })
            .map(|(name, _, _)| name.clone())
            .collect();
        let filter = DeviceFilter::from_selector(&sel, online.clone());
        // Whole, and in pages of 7 by cursor.
        let whole: Vec<String> = store
            .select_devices(&filter, 1000, None)
            .await
            .expect("select")
            .into_iter()
            .map(|d| d.id.to_string())
            .collect();
        assert_eq!(whole, expected, "selector {text:?}");
        let mut paged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store
                .select_devices(&filter, 7, after.as_deref())
                .await
                .expect("page");
            paged.extend(page.iter().map(|d| d.id.to_string()));
            if page.len() < 7 {
                break;
            }
            after = page.last().map(|d| d.id.to_string());
        }
        assert_eq!(paged, expected, "paged selector {text:?}");
        // Counts per version: most devices first, ties by version, unknown last.
        let mut counts: BTreeMap<Option<String>, u64> = BTreeMap::new();
        for (name, _, version) in &fleet {
            if expected.contains(name) {
                *counts.entry(version.clone()).or_default() += 1;
            }
        }
        let mut want: Vec<(Option<String>, u64)> = counts.into_iter().collect();
        want.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then(a.0.is_none().cmp(&b.0.is_none()))
                .then(a.0.cmp(&b.0))
        });
        let got = store
            .count_device_versions(&filter, 50)
            .await
            .expect("count");
        assert_eq!(got.total, expected.len() as u64, "total {text:?}");
        assert_eq!(got.versions, want, "versions {text:?}");
        let two = store
            .count_device_versions(&filter, 2)
            .await
            .expect("count");
        assert_eq!(two.total, expected.len() as u64, "total {text:?}");
        assert_eq!(
            two.versions,
            want.iter().take(2).cloned().collect::<Vec<_>>()
        );
    }
    // Tag changes and deletions are selected at once.
    let ids =
        |v: Vec<crate::DeviceRecord>| v.into_iter().map(|d| d.id.to_string()).collect::<Vec<_>>();
    let by = |text: &str| {
        DeviceFilter::from_selector(
            &Selector::parse(text).expect("selector"),
            OnlineFilter::default(),
        )
    };
    store
        .set_tags("d00", tags(&[("site", "nowhere")]))
        .await
        .expect("tags");
    assert_eq!(
        ids(store
            .select_devices(&by("tag:site=nowhere"), 10, None)
            .await
            .expect("select")),
        vec!["d00"]
    );
    assert!(!ids(store
        .select_devices(&by("tag:rare=yes"), 10, None)
        .await
        .expect("select"))
    .contains(&"d00".to_owned()));
    assert!(store.delete_device("d10").await.expect("delete"));
    assert_eq!(
        ids(store
            .select_devices(&by("tag:rare=yes"), 10, None)
            .await
            .expect("select")),
        vec!["d20", "d30", "d40", "d50"]
    );
    let counts = store
        .count_device_versions(&DeviceFilter::default(), 50)
        .await
        .expect("count");
    assert_eq!(counts.total, 59);
    assert_eq!(counts.versions.iter().map(|(_, n)| n).sum::<u64>(), 59);
    // A single node: only the devices held here are online.
    let single = DeviceFilter {
        online: Some(OnlineFilter {
            here: vec!["d07".into(), "ghost".into()],
            elsewhere: None,
        }),
        ..DeviceFilter::default()
    };
    let got = store
        .select_devices(&single, 10, None)
        .await
        .expect("select");
    assert_eq!(
        got.iter().map(|d| d.id.to_string()).collect::<Vec<_>>(),
        vec!["d07"]
    );
}
