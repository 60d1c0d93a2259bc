//! Conformance cases for [`ArtifactStore`](crate::ArtifactStore) and the store's chunk-table
//! [`ArtifactBlobs`](crate::ArtifactBlobs): round trip, one artifact per version, the count
//! bound, compare-and-set upload progress, ready once, chunks replaced and read by range,
//! deleted with their artifact.

use crate::{
    ArtifactBlobs, ArtifactCreate, ArtifactDelete, ArtifactRecord, ArtifactState, ArtifactStore,
    StoreError,
};

const T0: u64 = 1_700_000_000_000;

pub(super) fn artifact(n: u32, version: &str) -> ArtifactRecord {
    ArtifactRecord {
        id: format!("art_{n:016x}"),
        version: version.to_owned(),
        sha256: format!("{n:064x}"),
        size: 10,
        compatible: vec!["rev-b".to_owned(), "rev-c".to_owned()],
        notes: Some("fixes the sensor drift".to_owned()),
        manifest: format!("{{\"v\":1,\"n\":{n}}}").into_bytes(),
        signature: None,
        state: ArtifactState::Uploading,
        stored_bytes: 0,
        created_at_ms: T0 + u64::from(n),
        created_by: "tok_admin".to_owned(),
    }
}

/// Create and get back field for field; list by id with a cursor; a taken version is
/// `VersionTaken`, a taken id `AlreadyExists`, a full store `Full` (nothing stored).
pub async fn artifact_create_get_list_round_trip<S: ArtifactStore + ?Sized>(store: &S) {
    let a1 = artifact(1, "1.4.0");
    let mut a2 = artifact(2, "1.5.0-rc1");
    a2.notes = None;
    for a in [&a1, &a2] {
        assert_eq!(
            store.create_artifact(a.clone(), 10).await.expect("create"),
            ArtifactCreate::Created
        );
    }
    assert_eq!(
        store.get_artifact(&a1.id).await.expect("get"),
        Some(a1.clone())
    );
    assert_eq!(
        store.get_artifact(&a2.id).await.expect("get"),
        Some(a2.clone())
    );
    assert_eq!(store.get_artifact("art_ffffffff").await.expect("get"), None);
    assert_eq!(
        store
            .create_artifact(artifact(3, "1.4.0"), 10)
            .await
            .expect("create"),
        ArtifactCreate::VersionTaken
    );
    let mut same_id = artifact(1, "9.9.9");
    same_id.sha256 = "f".repeat(64);
    assert!(matches!(
        store.create_artifact(same_id, 10).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(
        store
            .create_artifact(artifact(4, "2.0.0"), 2)
            .await
            .expect("create"),
        ArtifactCreate::Full
    );
    assert_eq!(
        store.get_artifact(&artifact(4, "x").id).await.expect("get"),
        None
    );
    let page = store.list_artifacts(1, None).await.expect("list");
    assert_eq!(page, vec![a1.clone()]);
    let page = store.list_artifacts(10, Some(&a1.id)).await.expect("list");
    assert_eq!(page, vec![a2]);
    assert!(store
        .list_artifacts(0, None)
        .await
        .expect("list")
        .is_empty());
}

/// Upload progress moves only from where it is (two uploaders never both advance it), never
/// past the size, and not once ready; ready is set once, with its signature.
pub async fn artifact_advance_is_compare_and_set_and_ready_once<S: ArtifactStore + ?Sized>(
    store: &S,
) {
    let a = artifact(7, "3.0.0");
    store.create_artifact(a.clone(), 10).await.expect("create");
    assert!(store.advance_artifact(&a.id, 0, 4).await.expect("advance"));
    assert!(!store.advance_artifact(&a.id, 0, 4).await.expect("stale"));
    assert!(!store
        .advance_artifact(&a.id, 4, 11)
        .await
        .expect("past size"));
    assert!(store.advance_artifact(&a.id, 4, 10).await.expect("advance"));
    assert!(!store
        .advance_artifact("art_ffffffff", 0, 1)
        .await
        .expect("gone"));
    let sig = "ab".repeat(64);
    assert!(store.mark_artifact_ready(&a.id, &sig).await.expect("ready"));
    assert!(!store.mark_artifact_ready(&a.id, "cd").await.expect("twice"));
    let got = store.get_artifact(&a.id).await.expect("get").expect("some");
    assert_eq!(got.state, ArtifactState::Ready);
    assert_eq!(got.signature.as_deref(), Some(sig.as_str()));
    assert_eq!(got.stored_bytes, 10);
    assert!(!store.advance_artifact(&a.id, 10, 10).await.expect("ready"));
    assert!(!store.artifact_in_use(&a.id).await.expect("in use"));
}

/// Chunks are stored at their offsets; a write replaces what was stored from its offset on;
/// reads take any range; the chunks go with their artifact, and a chunk for no artifact is
/// `NotFound`.
pub async fn artifact_chunks_replace_read_by_range_and_go_with_the_artifact<S>(store: &S)
where
    S: ArtifactStore + ArtifactBlobs + ?Sized,
{
    let a = artifact(9, "4.0.0");
    store.create_artifact(a.clone(), 10).await.expect("create");
    store
        .write_blob(&a.id, 0, b"hello ".to_vec())
        .await
        .expect("w");
    store
        .write_blob(&a.id, 6, b"wxrld!!".to_vec())
        .await
        .expect("w");
    store
        .write_blob(&a.id, 6, b"world".to_vec())
        .await
        .expect("rewrite");
    assert_eq!(
        store.read_blob(&a.id, 0, 100).await.expect("r"),
        b"hello world"
    );
    assert_eq!(store.read_blob(&a.id, 4, 3).await.expect("r"), b"o w");
    assert_eq!(store.read_blob(&a.id, 6, 5).await.expect("r"), b"world");
    // Inside one chunk, both ends cut.
    assert_eq!(store.read_blob(&a.id, 7, 2).await.expect("r"), b"or");
    assert_eq!(store.read_blob(&a.id, 1, 1).await.expect("r"), b"e");
    assert!(store.read_blob(&a.id, 11, 5).await.expect("r").is_empty());
    // A write inside a chunk cuts it there.
    store.write_blob(&a.id, 3, b"p!".to_vec()).await.expect("w");
    assert_eq!(store.read_blob(&a.id, 0, 100).await.expect("r"), b"help!");
    assert!(matches!(
        store.write_blob("art_ffffffff", 0, vec![1]).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.delete_artifact(&a.id).await.expect("delete"),
        ArtifactDelete::Deleted
    );
    assert!(store.read_blob(&a.id, 0, 100).await.expect("r").is_empty());
    assert_eq!(
        store.delete_artifact(&a.id).await.expect("delete"),
        ArtifactDelete::NotFound
    );
    store.delete_blob(&a.id).await.expect("delete nothing");
}

/// `expire_uploads` deletes only artifacts still uploading created before the time, oldest ids
/// first up to the limit, with their chunks; ready ones and newer uploads stay.
pub async fn artifact_expire_uploads_deletes_only_old_uploading_ones_with_their_chunks<S>(store: &S)
where
    S: crate::Store + ?Sized,
{
    let (a1, a2, mut a3, a4) = (
        artifact(1, "1.0.0"),
        artifact(2, "2.0.0"),
        artifact(3, "3.0.0"),
        artifact(4, "4.0.0"),
    );
    a3.state = ArtifactState::Ready;
    a3.signature = Some("ab".repeat(64));
    for a in [&a1, &a2, &a3, &a4] {
        store.create_artifact(a.clone(), 10).await.expect("create");
    }
    store
        .write_blob(&a2.id, 0, b"hello".to_vec())
        .await
        .expect("chunk");
    assert_eq!(
        store.expire_uploads(T0 + 4, 1).await.expect("expire"),
        vec![a1.id.clone()]
    );
    assert_eq!(
        store.expire_uploads(T0 + 4, 10).await.expect("expire"),
        vec![a2.id.clone()]
    );
    assert!(store
        .expire_uploads(T0 + 4, 10)
        .await
        .expect("again")
        .is_empty());
    assert!(store
        .expire_uploads(T0 + 100, 0)
        .await
        .expect("none")
        .is_empty());
    for gone in [&a1, &a2] {
        assert!(store.get_artifact(&gone.id).await.expect("get").is_none());
    }
    assert!(store
        .read_blob(&a2.id, 0, 100)
        .await
        .expect("read")
        .is_empty());
    for kept in [&a3, &a4] {
        assert!(store.get_artifact(&kept.id).await.expect("get").is_some());
    }
}

fn update(dep: &str, device: &str) -> crate::DeviceUpdateRecord {
    crate::DeviceUpdateRecord {
        deployment_id: dep.to_owned(),
        device_id: device.to_owned(),
        artifact_id: artifact(11, "5.0.0").id,
        version: "5.0.0".to_owned(),
        command_id: None,
        state: mooring_proto::ota::UpdateState::Pending,
        reason: None,
        progress_pct: None,
        running_version: None,
        seq: None,
        updated_at_ms: T0,
    }
}

/// A deployment of artifact 11 (the one [`update`] names), created at `T0`, not canceled.
fn deployment(id: &str) -> crate::DeploymentRecord {
    crate::DeploymentRecord {
        id: id.to_owned(),
        artifact_id: artifact(11, "5.0.0").id,
        selector: "tag:site=north".to_owned(),
        allow_downgrade: false,
        created_by: "tok_admin".to_owned(),
        created_at_ms: T0,
        canceled_at_ms: None,
    }
}

/// A deployment is stored with its devices' updates (pending); reports apply only when newer
/// (`seq`); counts per state; a device's history; cancel keeps its first time; an artifact a
/// deployment names is in use and not deleted; a deployment of a missing artifact is
/// `NotFound`.
pub async fn deployment_updates_follow_newer_reports_and_hold_the_artifact<S>(store: &S)
where
    S: crate::Store + ?Sized,
{
    use mooring_proto::ota::UpdateState;
    for d in ["d1", "d2"] {
        store
            .create_device(super::new_device(d))
            .await
            .expect("device");
    }
    let a = artifact(11, "5.0.0");
    store.create_artifact(a.clone(), 10).await.expect("create");
    let dep = deployment("dep_0001");
    store
        .create_deployment(
            dep.clone(),
            vec![update("dep_0001", "d1"), update("dep_0001", "d2")],
            10,
        )
        .await
        .expect("deploy");
    assert_eq!(
        store.get_deployment("dep_0001").await.expect("get"),
        Some(dep.clone())
    );
    assert_eq!(
        store.list_deployments(None, 10).await.expect("list"),
        vec![dep.clone()]
    );
    let mut missing = dep.clone();
    missing.id = "dep_0002".to_owned();
    missing.artifact_id = "art_ffffffff".to_owned();
    assert!(matches!(
        store.create_deployment(missing, Vec::new(), 10).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(store
        .set_update_command("dep_0001", "d1", "c_1")
        .await
        .expect("cmd"));
    let mut r = update("dep_0001", "d1");
    r.state = UpdateState::Downloading;
    r.progress_pct = Some(40);
    r.seq = Some(5);
    r.updated_at_ms = T0 + 5;
    assert!(store.apply_update_report(r.clone()).await.expect("apply"));
    let mut older = r.clone();
    older.state = UpdateState::Deferred;
    older.seq = Some(4);
    assert!(!store
        .apply_update_report(older.clone())
        .await
        .expect("older"));
    older.seq = Some(5);
    assert!(!store
        .apply_update_report(older.clone())
        .await
        .expect("same seq"));
    // The server's own conclusion (no seq) never overwrites what the device reported.
    older.seq = None;
    older.state = UpdateState::Failed;
    assert!(!store.apply_update_report(older).await.expect("server"));
    let got = store
        .get_update("dep_0001", "d1")
        .await
        .expect("get")
        .expect("some");
    assert_eq!(
        (
            got.state,
            got.progress_pct,
            got.seq,
            got.command_id.as_deref()
        ),
        (UpdateState::Downloading, Some(40), Some(5), Some("c_1"))
    );
    let mut done = r.clone();
    done.state = UpdateState::Committed;
    done.running_version = Some("5.0.0".to_owned());
    done.seq = Some(9);
    assert!(store
        .apply_update_report(done.clone())
        .await
        .expect("apply"));
    // Final is sticky: a later report (crafted or replayed) changes nothing.
    let mut late = done.clone();
    late.state = UpdateState::RolledBack;
    late.seq = Some(10);
    assert!(!store.apply_update_report(late).await.expect("late"));
    let mut unknown = r.clone();
    unknown.device_id = "d9".to_owned();
    assert!(!store
        .apply_update_report(unknown)
        .await
        .expect("no such update"));
    let counts = store.count_updates("dep_0001").await.expect("count");
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        vec![("committed".to_owned(), 1), ("pending".to_owned(), 1)]
    );
    let page = store.list_updates("dep_0001", None, 1).await.expect("list");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].device_id, "d1");
    let page = store
        .list_updates("dep_0001", Some("d1"), 10)
        .await
        .expect("list");
    assert_eq!(
        page.iter()
            .map(|u| u.device_id.as_str())
            .collect::<Vec<_>>(),
        ["d2"]
    );
    let history = store.device_updates("d1", 10).await.expect("history");
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].running_version.as_deref(), Some("5.0.0"));
    let c = store
        .cancel_deployment("dep_0001", T0 + 10)
        .await
        .expect("cancel")
        .expect("some");
    assert_eq!(c.canceled_at_ms, Some(T0 + 10));
    let c = store
        .cancel_deployment("dep_0001", T0 + 20)
        .await
        .expect("cancel")
        .expect("some");
    assert_eq!(
        c.canceled_at_ms,
        Some(T0 + 10),
        "the first cancel time stays"
    );
    // A final state the server wrote (no seq: the cancel) yields to the device's own report.
    let mut guessed = update("dep_0001", "d2");
    guessed.state = UpdateState::Failed;
    guessed.reason = Some("canceled".to_owned());
    assert!(store.apply_update_report(guessed).await.expect("server"));
    let mut told = update("dep_0001", "d2");
    told.state = UpdateState::Committed;
    told.seq = Some(1);
    assert!(store.apply_update_report(told).await.expect("device"));
    let got = store.get_update("dep_0001", "d2").await.expect("get");
    assert_eq!(got.map(|u| u.state), Some(UpdateState::Committed));
    assert!(store.artifact_in_use(&a.id).await.expect("in use"));
    assert_eq!(
        store.delete_artifact(&a.id).await.expect("delete"),
        ArtifactDelete::InUse
    );
    assert!(store.get_artifact(&a.id).await.expect("get").is_some());
}

/// `unsent_updates` lists updates still pending without a command, of deployments not
/// canceled, by deployment then device, from a cursor: what a restart sends.
pub async fn deployment_unsent_updates_skip_sent_reported_and_canceled<S>(store: &S)
where
    S: crate::Store + ?Sized,
{
    use mooring_proto::ota::UpdateState;
    for d in ["d1", "d2", "d3"] {
        store
            .create_device(super::new_device(d))
            .await
            .expect("device");
    }
    let a = artifact(11, "5.0.0");
    store.create_artifact(a.clone(), 10).await.expect("create");
    for id in ["dep_0001", "dep_0002", "dep_0003"] {
        store
            .create_deployment(
                deployment(id),
                ["d1", "d2", "d3"].iter().map(|d| update(id, d)).collect(),
                10,
            )
            .await
            .expect("deploy");
    }
    // dep_0001: d1 sent, d2 reported (a device may report before its command id is stored).
    assert!(store
        .set_update_command("dep_0001", "d1", "c_1")
        .await
        .expect("cmd"));
    let mut r = update("dep_0001", "d2");
    r.state = UpdateState::Downloading;
    r.seq = Some(1);
    assert!(store.apply_update_report(r).await.expect("report"));
    // dep_0003 is canceled.
    store
        .cancel_deployment("dep_0003", T0 + 1)
        .await
        .expect("cancel");
    let pairs = |v: Vec<(String, String)>| {
        v.into_iter()
            .map(|(a, b)| format!("{a}/{b}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        pairs(store.unsent_updates(None, 100).await.expect("unsent")),
        ["dep_0001/d3", "dep_0002/d1", "dep_0002/d2", "dep_0002/d3"]
    );
    assert_eq!(
        pairs(store.unsent_updates(None, 2).await.expect("unsent")),
        ["dep_0001/d3", "dep_0002/d1"]
    );
    assert_eq!(
        pairs(
            store
                .unsent_updates(Some(("dep_0002", "d1")), 100)
                .await
                .expect("unsent")
        ),
        ["dep_0002/d2", "dep_0002/d3"]
    );
    assert!(store
        .unsent_updates(None, 0)
        .await
        .expect("none")
        .is_empty());
}

/// Creating a deployment past the count bound is `Full` (nothing stored); a deployment is
/// deleted (with its updates, freeing its artifact) only when every update is final, or when it
/// is canceled and every update is final or still pending; else `Active`; a missing one is
/// `NotFound`.
pub async fn deployment_count_bound_and_delete_only_when_over<S>(store: &S)
where
    S: crate::Store + ?Sized,
{
    use crate::{DeploymentCreate, DeploymentDelete, DeploymentRecord};
    use mooring_proto::ota::UpdateState;
    for d in ["d1", "d2"] {
        store
            .create_device(super::new_device(d))
            .await
            .expect("device");
    }
    let a = artifact(11, "5.0.0");
    store.create_artifact(a.clone(), 10).await.expect("create");
    let updates = |id: &str| vec![update(id, "d1"), update(id, "d2")];
    for id in ["dep_0001", "dep_0002"] {
        assert_eq!(
            store
                .create_deployment(deployment(id), updates(id), 2)
                .await
                .expect("deploy"),
            DeploymentCreate::Created
        );
    }
    assert_eq!(
        store
            .create_deployment(deployment("dep_0003"), updates("dep_0003"), 2)
            .await
            .expect("full"),
        DeploymentCreate::Full
    );
    assert!(store
        .get_deployment("dep_0003")
        .await
        .expect("get")
        .is_none());
    assert!(store
        .get_update("dep_0003", "d1")
        .await
        .expect("get")
        .is_none());

    // Pages, newest first (same creation time: by id), each after the last of the previous.
    let ids = |l: Vec<DeploymentRecord>| l.into_iter().map(|d| d.id).collect::<Vec<_>>();
    let first = ids(store.list_deployments(None, 1).await.expect("page"));
    assert_eq!(first, ["dep_0002"]);
    let second = ids(store
        .list_deployments(Some((T0, "dep_0002")), 1)
        .await
        .expect("page"));
    assert_eq!(second, ["dep_0001"]);
    assert!(store
        .list_deployments(Some((T0, "dep_0001")), 1)
        .await
        .expect("page")
        .is_empty());
    // dep_0001: one device committed, one still downloading: active.
    let report = |dep: &str, device: &str, state: UpdateState, seq: u64| {
        let mut r = update(dep, device);
        r.state = state;
        r.seq = Some(seq);
        r
    };
    for r in [
        report("dep_0001", "d1", UpdateState::Committed, 1),
        report("dep_0001", "d2", UpdateState::Downloading, 1),
    ] {
        assert!(store.apply_update_report(r).await.expect("report"));
    }
    assert_eq!(
        store.delete_deployment("dep_0001").await.expect("delete"),
        DeploymentDelete::Active
    );
    // Every update final: deleted, with its updates.
    assert!(store
        .apply_update_report(report("dep_0001", "d2", UpdateState::RolledBack, 2))
        .await
        .expect("report"));
    assert_eq!(
        store.delete_deployment("dep_0001").await.expect("delete"),
        DeploymentDelete::Deleted
    );
    assert!(store
        .get_deployment("dep_0001")
        .await
        .expect("get")
        .is_none());
    assert!(store
        .get_update("dep_0001", "d1")
        .await
        .expect("get")
        .is_none());
    assert_eq!(
        store.device_updates("d1", 10).await.expect("history").len(),
        1
    );
    assert_eq!(
        store.delete_deployment("dep_0001").await.expect("again"),
        DeploymentDelete::NotFound
    );
    // dep_0002: pending, so active, until canceled; canceled, still held while a device started
    // it (installing; deferred or downloading would hold it too), until that one ends.
    assert_eq!(
        store.delete_deployment("dep_0002").await.expect("delete"),
        DeploymentDelete::Active
    );
    assert!(store
        .apply_update_report(report("dep_0002", "d1", UpdateState::Installing, 1))
        .await
        .expect("report"));
    store
        .cancel_deployment("dep_0002", T0 + 1)
        .await
        .expect("cancel");
    assert_eq!(
        store.delete_deployment("dep_0002").await.expect("delete"),
        DeploymentDelete::Active
    );
    assert!(store
        .apply_update_report(report("dep_0002", "d1", UpdateState::Committed, 2))
        .await
        .expect("report"));
    assert_eq!(
        store.delete_deployment("dep_0002").await.expect("delete"),
        DeploymentDelete::Deleted
    );
    assert!(store
        .list_deployments(None, 10)
        .await
        .expect("list")
        .is_empty());
    // The artifact is free again; a place is free for a new deployment.
    assert!(!store.artifact_in_use(&a.id).await.expect("in use"));
    assert_eq!(
        store
            .create_deployment(deployment("dep_0003"), updates("dep_0003"), 2)
            .await
            .expect("deploy"),
        DeploymentCreate::Created
    );
    assert!(store
        .delete_deployment("dep_\0x")
        .await
        .is_ok_and(|d| d == DeploymentDelete::NotFound));
}

/// `ended_update_commands` lists the updates still pending and never reported on whose command
/// ended without success (failed, expired, canceled), from a cursor: not those whose command is
/// still going or succeeded, nor those the device reported on.
pub async fn deployment_ended_update_commands_list_unreported_updates_of_ended_commands<S>(
    store: &S,
) where
    S: crate::Store + ?Sized,
{
    use crate::{CommandRecord, CommandState};
    use mooring_proto::ota::UpdateState;
    let devices = ["d1", "d2", "d3", "d4", "d5"];
    for d in devices {
        store
            .create_device(super::new_device(d))
            .await
            .expect("device");
    }
    let a = artifact(11, "5.0.0");
    store.create_artifact(a.clone(), 10).await.expect("create");
    let dep = deployment("dep_0001");
    let updates = devices.iter().map(|d| update("dep_0001", d)).collect();
    store
        .create_deployment(dep, updates, 10)
        .await
        .expect("deploy");
    // d1 failed, d2 expired, d3 succeeded, d4 still queued, d5 failed but reported on.
    let ends = [
        ("d1", Some(CommandState::Failed)),
        ("d2", Some(CommandState::Expired)),
        ("d3", Some(CommandState::Succeeded)),
        ("d4", None),
        ("d5", Some(CommandState::Failed)),
    ];
    for (device, end) in ends {
        let id = format!("c_{device}");
        let queued = CommandRecord {
            id: id.clone(),
            device_id: super::id(device),
            name: "mooring.update".to_owned(),
            params: serde_json::json!({"deployment_id": "dep_0001"}),
            state: CommandState::Queued,
            attempts: 0,
            max_attempts: 5,
            created_at_ms: T0,
            expires_at_ms: T0 + 60_000,
            next_attempt_at_ms: T0,
            parent_id: None,
            idempotency_key: None,
            history: vec![(CommandState::Queued, T0)],
            result: None,
            result_timeout_ms: 0,
            synced_at_ms: None,
        };
        store
            .create_commands(None, vec![queued.clone()])
            .await
            .expect("command");
        if let Some(state) = end {
            let mut ended = queued;
            ended.state = state;
            ended.history.push((state, T0 + 1));
            assert!(store
                .update_command(ended, CommandState::Queued)
                .await
                .expect("end"));
        }
        assert!(store
            .set_update_command("dep_0001", device, &id)
            .await
            .expect("cmd"));
    }
    let mut r = update("dep_0001", "d5");
    r.state = UpdateState::Downloading;
    r.seq = Some(1);
    assert!(store.apply_update_report(r).await.expect("report"));
    let triples = |v: Vec<(String, String, String)>| {
        v.into_iter()
            .map(|(a, b, c)| format!("{a}/{b}/{c}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        triples(store.ended_update_commands(None, 100).await.expect("ended")),
        ["dep_0001/d1/c_d1", "dep_0001/d2/c_d2"]
    );
    assert_eq!(
        triples(
            store
                .ended_update_commands(Some(("dep_0001", "d1")), 1)
                .await
                .expect("ended")
        ),
        ["dep_0001/d2/c_d2"]
    );
    assert!(store
        .ended_update_commands(None, 0)
        .await
        .expect("none")
        .is_empty());
}
