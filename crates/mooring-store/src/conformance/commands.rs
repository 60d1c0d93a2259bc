//! Conformance cases for [`CommandStore`](crate::CommandStore): create, idempotency, compare-and-set, queries, fleet parents.

use super::*;

fn command(id: &str, device: &str, created_at_ms: u64) -> CommandRecord {
    CommandRecord {
        id: id.to_owned(),
        device_id: super::id(device),
        name: "reboot".to_owned(),
        params: serde_json::json!({"delay_secs": 5}),
        state: CommandState::Queued,
        attempts: 0,
        max_attempts: 5,
        created_at_ms,
        expires_at_ms: created_at_ms + 60_000,
        next_attempt_at_ms: created_at_ms,
        parent_id: None,
        idempotency_key: None,
        history: vec![(CommandState::Queued, created_at_ms)],
        result: None,
        result_timeout_ms: 0,
        synced_at_ms: None,
    }
}

async fn create_one(store: &dyn Store, c: CommandRecord) -> CreateOutcome {
    let mut out = store
        .create_commands(None, vec![c])
        .await
        .expect("create_commands");
    assert_eq!(out.len(), 1);
    out.remove(0)
}

pub async fn command_create_get_and_compare_and_set_update(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    let c = command("c1", "d1", 1000);
    assert_eq!(
        create_one(store, c.clone()).await,
        CreateOutcome::Created(c.clone())
    );
    assert_eq!(store.get_command("c1").await.expect("get"), Some(c.clone()));
    assert_eq!(store.get_command("nope").await.expect("get"), None);

    let mut done = c.clone();
    done.state = CommandState::Succeeded;
    done.attempts = 1;
    done.history.push((CommandState::Succeeded, 2000));
    done.result = Some(CommandOutcome {
        succeeded: true,
        output: serde_json::json!({"bundle": {"log": ["a", "b"]}}),
    });
    // Wrong expected state: nothing changes.
    assert!(!store
        .update_command(done.clone(), CommandState::Delivered)
        .await
        .expect("update"));
    assert_eq!(store.get_command("c1").await.expect("get"), Some(c));
    assert!(store
        .update_command(done.clone(), CommandState::Queued)
        .await
        .expect("update"));
    assert_eq!(store.get_command("c1").await.expect("get"), Some(done));
    // A duplicate command id is refused.
    let err = store
        .create_commands(None, vec![command("c1", "d1", 3000)])
        .await
        .expect_err("duplicate id");
    assert_eq!(err.kind(), "already_exists");
}

pub async fn command_idempotency_key_returns_the_existing_command(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    store.create_device(new_device("d2")).await.expect("device");
    let mut a = command("c1", "d1", 1000);
    a.idempotency_key = Some("k".into());
    let mut b = command("c2", "d1", 2000);
    b.idempotency_key = Some("k".into());
    let mut other_device = command("c3", "d2", 2000);
    other_device.idempotency_key = Some("k".into());
    assert!(matches!(
        create_one(store, a.clone()).await,
        CreateOutcome::Created(_)
    ));
    assert_eq!(create_one(store, b).await, CreateOutcome::Existing(a));
    assert!(store.get_command("c2").await.expect("get").is_none());
    assert!(matches!(
        create_one(store, other_device).await,
        CreateOutcome::Created(_)
    ));
}

/// A command executed on the device's local API is stored finished, with when it synced, and a
/// second delivery of the same result (same id, same key) stores nothing new.
pub async fn command_executed_locally_is_stored_once_with_its_sync_time(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    let mut local = command("lx1", "d1", 1000);
    local.state = CommandState::Succeeded;
    local.history = vec![
        (CommandState::Queued, 1000),
        (CommandState::Succeeded, 1250),
    ];
    local.result = Some(CommandOutcome {
        succeeded: true,
        output: serde_json::json!({"opened": true}),
    });
    local.idempotency_key = Some("l-1".into());
    local.synced_at_ms = Some(90_000);
    assert_eq!(
        create_one(store, local.clone()).await,
        CreateOutcome::Created(local.clone())
    );
    assert_eq!(
        store.get_command("lx1").await.expect("get"),
        Some(local.clone())
    );
    let mut again = local.clone();
    again.synced_at_ms = Some(95_000);
    assert_eq!(
        create_one(store, again).await,
        CreateOutcome::Existing(local.clone())
    );
    // Finished: never due, never pending.
    assert!(store
        .due_commands(10_000_000, 10)
        .await
        .expect("due")
        .is_empty());
    let listed = store
        .list_commands("d1", None, 10, None)
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].synced_at_ms, Some(90_000));
}

pub async fn command_for_a_missing_device_is_not_found_and_nothing_is_stored(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    let parent = CommandParentRecord {
        id: "f1".into(),
        selector: "d1,ghost".into(),
        name: "reboot".into(),
        params: serde_json::Value::Null,
        created_at_ms: 1000,
        expires_at_ms: 2000,
        total: 2,
    };
    let err = store
        .create_commands(
            Some(parent),
            vec![command("c1", "d1", 1000), command("c2", "ghost", 1000)],
        )
        .await
        .expect_err("missing device");
    assert_eq!(err.kind(), "not_found");
    assert!(store.get_command("c1").await.expect("get").is_none());
    assert!(store.get_command_parent("f1").await.expect("get").is_none());
}

pub async fn command_list_is_newest_first_with_state_filter_and_cursor(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    store.create_device(new_device("d2")).await.expect("device");
    let batch: Vec<CommandRecord> = (0..5)
        .map(|i| command(&format!("c{i}"), "d1", 1000 + i))
        .chain([command("x", "d2", 1000)])
        .collect();
    store.create_commands(None, batch).await.expect("create");
    let mut c3 = store.get_command("c3").await.expect("get").expect("c3");
    c3.state = CommandState::Canceled;
    assert!(store
        .update_command(c3, CommandState::Queued)
        .await
        .expect("update"));
    let ids = |v: Vec<CommandRecord>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
    let page = store
        .list_commands("d1", None, 2, None)
        .await
        .expect("list");
    assert_eq!(ids(page), ["c4", "c3"]);
    let page = store
        .list_commands("d1", None, 10, Some("c3"))
        .await
        .expect("list");
    assert_eq!(ids(page), ["c2", "c1", "c0"]);
    let page = store
        .list_commands("d1", Some(CommandState::Canceled), 10, None)
        .await
        .expect("list");
    assert_eq!(ids(page), ["c3"]);
    assert!(
        store
            .list_commands("d1", None, 10, Some("x"))
            .await
            .is_err(),
        "cursor of another device"
    );
}

pub async fn command_pending_and_due_queries_follow_state_and_times(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    let batch: Vec<CommandRecord> = (0..4)
        .map(|i| command(&format!("c{i}"), "d1", 1000 + i))
        .collect();
    store.create_commands(None, batch).await.expect("create");
    let set = |id: &str, state: CommandState, next_ms: u64, expires_ms: u64| {
        let id = id.to_owned();
        async move {
            let mut c = store.get_command(&id).await.expect("get").expect("exists");
            let from = c.state;
            c.state = state;
            c.next_attempt_at_ms = next_ms;
            c.expires_at_ms = expires_ms;
            assert!(store.update_command(c, from).await.expect("update"));
        }
    };
    // c0 queued (expires 61000); c1 delivered, retry due at 5000; c2 delivered, retry at 9000;
    // c3 acknowledged.
    set("c1", CommandState::Delivered, 5000, 61_001).await;
    set("c2", CommandState::Delivered, 9000, 61_002).await;
    set("c3", CommandState::Acknowledged, 0, 0).await;
    let ids = |v: Vec<CommandRecord>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
    let p = store
        .pending_commands("d1", 6000, false, 10)
        .await
        .expect("pending");
    assert_eq!(ids(p), ["c0", "c1"]);
    let p = store
        .pending_commands("d1", 6000, true, 10)
        .await
        .expect("pending");
    assert_eq!(ids(p), ["c0", "c1", "c2", "c3"]);
    let p = store
        .pending_commands("d1", 6000, true, 1)
        .await
        .expect("pending");
    assert_eq!(ids(p), ["c0"]);
    assert_eq!(
        ids(store.due_commands(4000, 10).await.expect("due")),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(store.due_commands(9000, 10).await.expect("due")),
        ["c1", "c2"]
    );
    // Expiry makes queued ones due too; the acknowledged one never is.
    assert_eq!(
        ids(store.due_commands(100_000, 10).await.expect("due")),
        ["c0", "c1", "c2"]
    );
    assert_eq!(store.due_commands(100_000, 2).await.expect("due").len(), 2);
    // An acknowledged command with a result timeout is due once its deadline (kept in
    // next_attempt_at_ms) passes; the timeout is stored with it.
    let mut c4 = command("c4", "d1", 1000);
    c4.result_timeout_ms = 30_000;
    store.create_commands(None, vec![c4]).await.expect("create");
    set("c4", CommandState::Acknowledged, 50_000, 61_004).await;
    let c4 = store.get_command("c4").await.expect("get").expect("c4");
    assert_eq!(c4.result_timeout_ms, 30_000);
    assert!(!ids(store.due_commands(49_999, 10).await.expect("due")).contains(&"c4".to_owned()));
    assert_eq!(
        ids(store.due_commands(100_000, 10).await.expect("due")),
        ["c0", "c1", "c2", "c4"]
    );
}

pub async fn command_fleet_parent_counts_children_per_state(store: &dyn Store) {
    for i in 0..3 {
        store
            .create_device(new_device(&format!("d{i}")))
            .await
            .expect("device");
    }
    let parent = CommandParentRecord {
        id: "f1".into(),
        selector: "tag:site=north".into(),
        name: "reboot".into(),
        params: serde_json::json!({"a": 1}),
        created_at_ms: 1000,
        expires_at_ms: 61_000,
        total: 3,
    };
    let children: Vec<CommandRecord> = (0..3)
        .map(|i| {
            let mut c = command(&format!("c{i}"), &format!("d{i}"), 1000);
            c.parent_id = Some("f1".into());
            c
        })
        .collect();
    let out = store
        .create_commands(Some(parent.clone()), children)
        .await
        .expect("create");
    assert_eq!(out.len(), 3);
    assert_eq!(
        store.get_command_parent("f1").await.expect("get"),
        Some(parent)
    );
    let mut c0 = store.get_command("c0").await.expect("get").expect("c0");
    c0.state = CommandState::Expired;
    assert!(store
        .update_command(c0, CommandState::Queued)
        .await
        .expect("update"));
    let counts = store.count_children("f1").await.expect("count");
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [(CommandState::Queued, 2), (CommandState::Expired, 1)]
    );
    assert!(store
        .count_children("nope")
        .await
        .expect("count")
        .is_empty());
}

pub async fn command_and_shadow_are_deleted_with_their_device(store: &dyn Store) {
    store.create_device(new_device("d1")).await.expect("device");
    create_one(store, command("c1", "d1", 1000)).await;
    let shadow = ShadowRecord {
        version: 1,
        ..ShadowRecord::empty(id("d1"))
    };
    assert!(store.save_shadow(shadow, 0).await.expect("save"));
    assert!(store.delete_device("d1").await.expect("delete"));
    assert!(store.get_command("c1").await.expect("get").is_none());
    assert!(store.get_shadow("d1").await.expect("get").is_none());
}

/// Many writes at once (a backend may commit them together): each failing one leaves nothing,
/// each succeeding one is stored and answered only as stored.
pub async fn concurrent_writes_that_fail_roll_back_alone(store: Arc<dyn Store>) {
    store.create_device(new_device("d1")).await.expect("device");
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let store = Arc::clone(&store);
        writes.spawn(async move {
            // Odd writes name a missing device after a valid one: refused whole.
            let mut batch = vec![command(&format!("c{i}"), "d1", 1000 + i)];
            if i % 2 == 1 {
                batch.push(command(&format!("g{i}"), "ghost", 1000 + i));
            }
            (i, store.create_commands(None, batch).await)
        });
    }
    while let Some(joined) = writes.join_next().await {
        let (i, result) = joined.expect("write task");
        match result {
            Ok(outcomes) => assert!(i % 2 == 0 && outcomes.len() == 1, "{i}: {outcomes:?}"),
            Err(e) => assert!(i % 2 == 1 && e.kind() == "not_found", "{i}: {e}"),
        }
    }
    for i in 0..200u64 {
        let stored = store.get_command(&format!("c{i}")).await.expect("get");
        assert_eq!(stored.is_some(), i % 2 == 0, "c{i}");
    }
    let listed = store
        .list_commands("d1", None, 500, None)
        .await
        .expect("list");
    assert_eq!(listed.len(), 100);
}
