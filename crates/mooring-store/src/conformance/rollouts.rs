//! Conformance cases for [`RolloutStore`](crate::RolloutStore): a rollout created whole with
//! its deployment (bounded, its artifact checked, ids unique), compare-and-set updates, waiting
//! devices by rank, each device started once (its update added once), deferrals, progress per
//! wave, baselines, and the pruned event log.

use std::collections::BTreeMap;

use mooring_proto::ota::UpdateState;

use super::artifacts::artifact;
use crate::{
    DeploymentDelete, DeploymentRecord, DeviceUpdateRecord, RolloutCreate, RolloutDeviceRecord,
    RolloutEventRecord, RolloutRecord, Store, StoreError, WaveProgress,
};

const T0: u64 = 1_700_000_000_000;

fn rollout(n: u32, created_at_ms: u64) -> RolloutRecord {
    RolloutRecord {
        id: format!("rol_{n:04}"),
        deployment_id: format!("dep_r{n:04}"),
        artifact_id: artifact(21, "6.0.0").id,
        selector: "tag:site=north".to_owned(),
        spec: "{\"waves\":[10,50,100]}".to_owned(),
        // Any u64 round-trips, the top bit too.
        seed: u64::MAX - 7,
        state: "running".to_owned(),
        wave: 0,
        reason: None,
        gate: None,
        window_started_at_ms: None,
        rollback_of: None,
        created_by: "ops@example.com".to_owned(),
        created_at_ms,
        updated_at_ms: created_at_ms,
        revision: 0,
    }
}

/// The rollout's deployment, as `create_deployment` would store it.
fn deployment_of(r: &RolloutRecord) -> DeploymentRecord {
    DeploymentRecord {
        id: r.deployment_id.clone(),
        artifact_id: r.artifact_id.clone(),
        selector: r.selector.clone(),
        allow_downgrade: false,
        created_by: r.created_by.clone(),
        created_at_ms: r.created_at_ms,
        canceled_at_ms: None,
    }
}

fn device(r: &RolloutRecord, device: &str, wave: u32, rank: u64) -> RolloutDeviceRecord {
    RolloutDeviceRecord {
        rollout_id: r.id.clone(),
        device_id: device.to_owned(),
        wave,
        rank,
        started_at_ms: None,
        from_version: None,
        deferred: None,
        baseline: None,
    }
}

/// The pending update a rollout adds for each device it starts.
fn pending(r: &RolloutRecord) -> DeviceUpdateRecord {
    DeviceUpdateRecord {
        deployment_id: r.deployment_id.clone(),
        device_id: String::new(),
        artifact_id: r.artifact_id.clone(),
        version: "6.0.0".to_owned(),
        command_id: None,
        state: UpdateState::Pending,
        reason: None,
        progress_pct: None,
        running_version: None,
        seq: None,
        updated_at_ms: T0 + 100,
    }
}

fn event(r: &RolloutRecord, n: u64) -> RolloutEventRecord {
    RolloutEventRecord {
        rollout_id: r.id.clone(),
        seq: 0,
        at_ms: T0 + n,
        by: "server".to_owned(),
        kind: "wave_started".to_owned(),
        detail: format!("{{\"n\":{n}}}"),
    }
}

fn ids(v: &[RolloutRecord]) -> Vec<&str> {
    v.iter().map(|r| r.id.as_str()).collect()
}

fn device_ids(v: &[RolloutDeviceRecord]) -> Vec<&str> {
    v.iter().map(|d| d.device_id.as_str()).collect()
}

fn wave(
    wave: u32,
    total: u64,
    waiting: u64,
    deferred: u64,
    states: &[(&str, u64)],
) -> WaveProgress {
    WaveProgress {
        wave,
        total,
        waiting,
        deferred,
        states: states
            .iter()
            .map(|(s, n)| ((*s).to_owned(), *n))
            .collect::<BTreeMap<_, _>>(),
    }
}

pub async fn rollouts_start_each_device_once_progress_cas_and_event_log(store: &dyn Store) {
    for d in ["d1", "d2", "d3", "d4", "d5", "d6"] {
        store
            .create_device(super::new_device(d))
            .await
            .expect("device");
    }
    store
        .create_artifact(artifact(21, "6.0.0"), 10)
        .await
        .expect("artifact");

    // Created whole: the rollout, its deployment (no updates) and its devices; a device that
    // is not registered (deleted meanwhile) is skipped.
    let r1 = rollout(1, T0);
    let devices = vec![
        device(&r1, "d1", 0, 30),
        device(&r1, "d2", 0, 10),
        device(&r1, "d3", 1, 20),
        device(&r1, "d4", 1, 5),
        device(&r1, "d5", 2, 1),
        device(&r1, "ghost", 0, 2),
    ];
    assert_eq!(
        store
            .create_rollout(r1.clone(), deployment_of(&r1), devices, 3)
            .await
            .expect("create"),
        RolloutCreate::Created
    );
    assert_eq!(
        store.get_rollout(&r1.id).await.expect("get"),
        Some(r1.clone())
    );
    assert_eq!(
        store.get_deployment(&r1.deployment_id).await.expect("get"),
        Some(deployment_of(&r1))
    );
    assert!(store
        .count_updates(&r1.deployment_id)
        .await
        .expect("count")
        .is_empty());
    assert_eq!(store.get_rollout("rol_none").await.expect("get"), None);

    // A missing artifact stores nothing.
    let mut lost = rollout(9, T0 + 9);
    lost.artifact_id = "art_ffffffff".to_owned();
    assert_eq!(
        store
            .create_rollout(lost.clone(), deployment_of(&lost), Vec::new(), 3)
            .await
            .expect("create"),
        RolloutCreate::ArtifactNotFound
    );
    assert_eq!(store.get_rollout(&lost.id).await.expect("get"), None);
    assert_eq!(
        store
            .get_deployment(&lost.deployment_id)
            .await
            .expect("get"),
        None
    );

    // A taken rollout id, or a taken deployment id: `AlreadyExists`, nothing stored.
    let mut same_id = rollout(1, T0 + 5);
    same_id.deployment_id = "dep_other".to_owned();
    let dev = device(&same_id, "d6", 0, 1);
    assert!(matches!(
        store
            .create_rollout(same_id.clone(), deployment_of(&same_id), vec![dev], 3)
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(
        store.get_deployment("dep_other").await.expect("get"),
        None,
        "the deployment went with the refused rollout"
    );
    let mut same_dep = rollout(8, T0 + 8);
    same_dep.deployment_id = r1.deployment_id.clone();
    assert!(matches!(
        store
            .create_rollout(same_dep.clone(), deployment_of(&same_dep), Vec::new(), 3)
            .await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(store.get_rollout(&same_dep.id).await.expect("get"), None);
    assert_eq!(
        store.get_rollout(&r1.id).await.expect("get"),
        Some(r1.clone())
    );

    // The bound is on rollouts (deployments made otherwise do not count).
    let mut r2 = rollout(2, T0 + 1);
    r2.state = "paused".to_owned();
    r2.reason = Some("gate failed".to_owned());
    r2.rollback_of = Some(r1.id.clone());
    assert_eq!(
        store
            .create_rollout(r2.clone(), deployment_of(&r2), Vec::new(), 2)
            .await
            .expect("create"),
        RolloutCreate::Created
    );
    let mut r3 = rollout(3, T0 + 2);
    r3.state = "completed".to_owned();
    assert_eq!(
        store
            .create_rollout(r3.clone(), deployment_of(&r3), Vec::new(), 2)
            .await
            .expect("create"),
        RolloutCreate::Full
    );
    assert_eq!(store.get_rollout(&r3.id).await.expect("get"), None);
    assert_eq!(
        store.get_deployment(&r3.deployment_id).await.expect("get"),
        None
    );
    assert_eq!(
        store
            .create_rollout(r3.clone(), deployment_of(&r3), Vec::new(), 3)
            .await
            .expect("create"),
        RolloutCreate::Created
    );
    assert_eq!(
        store.get_rollout(&r2.id).await.expect("get"),
        Some(r2.clone())
    );

    // Newest first with a cursor; active ones (running, paused) by id.
    let all = store.list_rollouts(None, 10).await.expect("list");
    assert_eq!(ids(&all), [&r3.id, &r2.id, &r1.id]);
    assert_eq!(all[2], r1);
    let page = store
        .list_rollouts(Some((r3.created_at_ms, &r3.id)), 1)
        .await
        .expect("list");
    assert_eq!(ids(&page), [&r2.id]);
    let page = store
        .list_rollouts(Some((r2.created_at_ms, &r2.id)), 10)
        .await
        .expect("list");
    assert_eq!(ids(&page), [&r1.id]);
    assert!(store.list_rollouts(None, 0).await.expect("list").is_empty());
    let active = store.active_rollouts(None, 10).await.expect("active");
    assert_eq!(ids(&active), [&r1.id, &r2.id]);
    let active = store.active_rollouts(None, 1).await.expect("active");
    assert_eq!(ids(&active), [&r1.id]);
    let active = store
        .active_rollouts(Some(&r1.id), 10)
        .await
        .expect("active");
    assert_eq!(ids(&active), [&r2.id]);

    // Compare-and-set on the revision; every mutable field is written, the rest stays.
    let mut moved = r1.clone();
    moved.state = "paused".to_owned();
    moved.wave = 1;
    moved.reason = Some("manual".to_owned());
    moved.gate = Some("{\"passed\":true}".to_owned());
    moved.window_started_at_ms = Some(T0 + 50);
    moved.updated_at_ms = T0 + 60;
    moved.spec = "{\"waves\":[10,100]}".to_owned();
    moved.selector = "tag:site=south".to_owned();
    assert!(store.update_rollout(&moved).await.expect("update"));
    let mut expected = moved.clone();
    expected.revision = 1;
    assert_eq!(
        store.get_rollout(&r1.id).await.expect("get"),
        Some(expected.clone())
    );
    let mut stale = r1.clone();
    stale.state = "aborted".to_owned();
    assert!(!store.update_rollout(&stale).await.expect("stale"));
    assert_eq!(
        store.get_rollout(&r1.id).await.expect("get"),
        Some(expected.clone()),
        "a stale revision changes nothing"
    );
    let mut gone = expected.clone();
    gone.id = "rol_none".to_owned();
    assert!(!store.update_rollout(&gone).await.expect("gone"));
    let mut running = expected.clone();
    running.state = "running".to_owned();
    running.reason = None;
    running.window_started_at_ms = None;
    assert!(store.update_rollout(&running).await.expect("update"));
    let r1_now = store.get_rollout(&r1.id).await.expect("get").expect("some");
    assert_eq!((r1_now.revision, r1_now.reason), (2, None));
    assert_eq!(r1_now.deployment_id, r1.deployment_id);
    assert_eq!(r1_now.created_at_ms, r1.created_at_ms);

    // Waiting devices: waves up to the one given, by rank then id, in pages.
    let waiting = |wave: u32, after: Option<(u64, &'static str)>, limit: usize| {
        let id = r1.id.clone();
        async move {
            store
                .waiting_rollout_devices(&id, wave, after, limit)
                .await
                .expect("waiting")
        }
    };
    assert_eq!(device_ids(&waiting(0, None, 10).await), ["d2", "d1"]);
    assert_eq!(
        device_ids(&waiting(1, None, 10).await),
        ["d4", "d2", "d3", "d1"]
    );
    assert_eq!(device_ids(&waiting(1, None, 2).await), ["d4", "d2"]);
    assert_eq!(
        device_ids(&waiting(1, Some((10, "d2")), 2).await),
        ["d3", "d1"]
    );
    assert!(waiting(1, Some((30, "d1")), 2).await.is_empty());
    assert_eq!(
        device_ids(&waiting(2, None, 10).await),
        ["d5", "d4", "d2", "d3", "d1"]
    );
    assert_eq!(waiting(0, None, 1).await, vec![device(&r1, "d2", 0, 10)]);

    // Deferrals, then starts: each device once, its update added once, its deferral cleared.
    store
        .defer_rollout_devices(
            &r1.id,
            vec![
                ("d4".to_owned(), "battery low".to_owned()),
                ("d1".to_owned(), "busy".to_owned()),
            ],
        )
        .await
        .expect("defer");
    let started = store
        .start_rollout_devices(
            &r1.id,
            vec![
                ("d4".to_owned(), Some("5.0.0".to_owned())),
                ("d2".to_owned(), None),
                ("ghost".to_owned(), None),
            ],
            pending(&r1),
            T0 + 100,
        )
        .await
        .expect("start");
    assert_eq!(started, ["d4", "d2"]);
    let again = store
        .start_rollout_devices(
            &r1.id,
            vec![("d2".to_owned(), None), ("d4".to_owned(), None)],
            pending(&r1),
            T0 + 150,
        )
        .await
        .expect("start again");
    assert!(again.is_empty(), "no device starts twice: {again:?}");
    // A paused rollout starts nobody (a pause stored during a start pass stops it at once).
    let mut paused = store.get_rollout(&r1.id).await.expect("get").expect("r1");
    let state = paused.state.clone();
    paused.state = "paused".to_owned();
    assert!(store.update_rollout(&paused).await.expect("pause"));
    assert!(store
        .start_rollout_devices(
            &r1.id,
            vec![("d3".to_owned(), None)],
            pending(&r1),
            T0 + 120
        )
        .await
        .expect("paused")
        .is_empty());
    let mut back = store.get_rollout(&r1.id).await.expect("get").expect("r1");
    back.state = state;
    assert!(store.update_rollout(&back).await.expect("resume"));
    // Which rollouts a device is in.
    assert!(store
        .device_rollouts("d4", 10)
        .await
        .expect("rollouts")
        .contains(&r1.id));
    assert!(store
        .device_rollouts("ghost", 10)
        .await
        .expect("rollouts")
        .is_empty());
    assert!(store
        .start_rollout_devices("rol_none", vec![("d3".to_owned(), None)], pending(&r1), T0)
        .await
        .expect("no rollout")
        .is_empty());
    let mut want = pending(&r1);
    want.device_id = "d4".to_owned();
    assert_eq!(
        store
            .get_update(&r1.deployment_id, "d4")
            .await
            .expect("get"),
        Some(want)
    );
    assert_eq!(
        store
            .count_updates(&r1.deployment_id)
            .await
            .expect("count")
            .into_iter()
            .collect::<Vec<_>>(),
        [("pending".to_owned(), 2)]
    );
    // A started device's deferral is left alone (none).
    store
        .defer_rollout_devices(&r1.id, vec![("d4".to_owned(), "late".to_owned())])
        .await
        .expect("defer");
    assert_eq!(
        device_ids(&waiting(1, None, 10).await),
        ["d3", "d1"],
        "started devices wait no more"
    );

    // A device reports its update committed.
    let mut done = pending(&r1);
    done.device_id = "d4".to_owned();
    done.state = UpdateState::Committed;
    done.running_version = Some("6.0.0".to_owned());
    done.seq = Some(3);
    done.updated_at_ms = T0 + 120;
    assert!(store.apply_update_report(done).await.expect("report"));

    assert_eq!(
        store.rollout_progress(&r1.id).await.expect("progress"),
        vec![
            wave(0, 2, 1, 1, &[("pending", 1)]),
            wave(1, 2, 1, 0, &[("committed", 1)]),
            wave(2, 1, 1, 0, &[]),
        ]
    );
    assert!(store
        .rollout_progress(&r2.id)
        .await
        .expect("progress")
        .is_empty());
    assert!(store
        .rollout_progress("rol_none")
        .await
        .expect("progress")
        .is_empty());

    // Starts counted by time.
    assert_eq!(
        store
            .count_rollout_started_since(&r1.id, T0 + 100)
            .await
            .expect("count"),
        2
    );
    assert_eq!(
        store
            .count_rollout_started_since(&r1.id, T0 + 101)
            .await
            .expect("count"),
        0
    );
    let started = store
        .start_rollout_devices(
            &r1.id,
            vec![("d3".to_owned(), None)],
            pending(&r1),
            T0 + 200,
        )
        .await
        .expect("start");
    assert_eq!(started, ["d3"]);
    assert_eq!(
        store
            .count_rollout_started_since(&r1.id, T0 + 150)
            .await
            .expect("count"),
        1
    );
    assert_eq!(
        store
            .count_rollout_started_since(&r1.id, 0)
            .await
            .expect("count"),
        3
    );

    // Devices by id, each with its update's state once started.
    let listed = store
        .list_rollout_devices(&r1.id, None, 10)
        .await
        .expect("list");
    let states: Vec<(&str, Option<UpdateState>)> = listed
        .iter()
        .map(|(d, s)| (d.device_id.as_str(), *s))
        .collect();
    assert_eq!(
        states,
        [
            ("d1", None),
            ("d2", Some(UpdateState::Pending)),
            ("d3", Some(UpdateState::Pending)),
            ("d4", Some(UpdateState::Committed)),
            ("d5", None),
        ]
    );
    let mut d4 = device(&r1, "d4", 1, 5);
    d4.started_at_ms = Some(T0 + 100);
    d4.from_version = Some("5.0.0".to_owned());
    assert_eq!(listed[3].0, d4, "started: its deferral cleared");
    let mut d1 = device(&r1, "d1", 0, 30);
    d1.deferred = Some("busy".to_owned());
    assert_eq!(listed[0].0, d1);
    let page = store
        .list_rollout_devices(&r1.id, Some("d2"), 2)
        .await
        .expect("list");
    assert_eq!(
        page.iter()
            .map(|(d, _)| d.device_id.as_str())
            .collect::<Vec<_>>(),
        ["d3", "d4"]
    );

    // Baselines set, then one cleared.
    store
        .set_rollout_baselines(
            &r1.id,
            vec![
                ("d1".to_owned(), Some("{\"crashes\":1}".to_owned())),
                ("d4".to_owned(), Some("{}".to_owned())),
            ],
        )
        .await
        .expect("baselines");
    store
        .set_rollout_baselines(&r1.id, vec![("d1".to_owned(), None)])
        .await
        .expect("clear");
    let listed = store
        .list_rollout_devices(&r1.id, None, 10)
        .await
        .expect("list");
    let baselines: Vec<(&str, Option<&str>)> = listed
        .iter()
        .map(|(d, _)| (d.device_id.as_str(), d.baseline.as_deref()))
        .collect();
    assert_eq!(
        baselines,
        [
            ("d1", None),
            ("d2", None),
            ("d3", None),
            ("d4", Some("{}")),
            ("d5", None),
        ]
    );

    // Devices added later: one already in stays as it is.
    assert_eq!(
        store
            .add_rollout_devices(
                &r1.id,
                vec![device(&r1, "d1", 2, 99), device(&r1, "d6", 1, 7)]
            )
            .await
            .expect("add"),
        1
    );
    assert_eq!(
        device_ids(&waiting(1, None, 10).await),
        ["d6", "d1"],
        "d1 kept its rank and wave; d3 started"
    );
    let listed = store
        .list_rollout_devices(&r1.id, Some("d5"), 10)
        .await
        .expect("list");
    assert_eq!(listed, vec![(device(&r1, "d6", 1, 7), None)]);
    assert!(matches!(
        store
            .add_rollout_devices("rol_none", vec![device(&r1, "d1", 0, 1)])
            .await,
        Err(StoreError::NotFound(_))
    ));

    // The event log: seq 1, 2, ... per rollout, the newest `keep_max` kept.
    for n in 1..=5 {
        assert_eq!(
            store
                .append_rollout_event(event(&r1, n), 3)
                .await
                .expect("append"),
            n
        );
    }
    assert_eq!(
        store
            .append_rollout_event(event(&r2, 1), 3)
            .await
            .expect("append"),
        1,
        "seqs are per rollout"
    );
    let events = store
        .list_rollout_events(&r1.id, 0, 10)
        .await
        .expect("events");
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
    let mut third = event(&r1, 3);
    third.seq = 3;
    assert_eq!(events[0], third);
    let events = store
        .list_rollout_events(&r1.id, 3, 10)
        .await
        .expect("events");
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
    let events = store
        .list_rollout_events(&r1.id, 0, 1)
        .await
        .expect("events");
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
    assert!(store
        .list_rollout_events(&r1.id, 5, 10)
        .await
        .expect("events")
        .is_empty());
    assert!(matches!(
        store
            .append_rollout_event(event(&rollout(7, T0), 1), 3)
            .await,
        Err(StoreError::NotFound(_))
    ));

    // A deleted device leaves the rollout; a rollout goes with its deployment.
    assert!(store.delete_device("d6").await.expect("delete"));
    assert_eq!(device_ids(&waiting(2, None, 10).await), ["d5", "d1"]);
    assert_eq!(
        store
            .delete_deployment(&r3.deployment_id)
            .await
            .expect("delete"),
        DeploymentDelete::Deleted
    );
    assert_eq!(store.get_rollout(&r3.id).await.expect("get"), None);
    assert_eq!(
        ids(&store.list_rollouts(None, 10).await.expect("list")),
        [&r2.id, &r1.id]
    );
}
