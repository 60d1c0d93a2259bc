//! Conformance cases for [`AuditStore`](crate::AuditStore): append order and ids, every filter,
//! cursor paging, retention.

use crate::{AuditQuery, AuditRecord, AuditStore};

const T0: u64 = 1_700_000_000_000;

fn entry(at_ms: u64, actor: &str, action: &str, target: &str) -> AuditRecord {
    AuditRecord {
        id: 0,
        at_ms,
        actor: actor.to_owned(),
        action: action.to_owned(),
        target: target.to_owned(),
        source: "192.0.2.7".to_owned(),
        node: "node-a".to_owned(),
        status: 200,
        detail: String::new(),
    }
}

fn query() -> AuditQuery {
    AuditQuery {
        limit: 1_000,
        ..AuditQuery::default()
    }
}

async fn list<S: AuditStore + ?Sized>(store: &S, q: AuditQuery) -> Vec<AuditRecord> {
    store.list_audit(q).await.expect("list_audit")
}

/// The `target`s of what `q` lists, in order.
async fn targets<S: AuditStore + ?Sized>(store: &S, q: AuditQuery) -> Vec<String> {
    list(store, q).await.into_iter().map(|e| e.target).collect()
}

pub async fn audit_append_assigns_increasing_ids_listed_newest_first<S: AuditStore + ?Sized>(
    store: &S,
) {
    assert!(list(store, query()).await.is_empty());
    store.append_audit(Vec::new()).await.expect("empty append");
    // Ids are the store's: whatever the caller put there is ignored. Times need not increase.
    let first: Vec<AuditRecord> = (0..5u64)
        .map(|i| AuditRecord {
            id: 99,
            ..entry(
                T0 + 10 - i,
                "user:ada@example.com",
                "device.create",
                &format!("/a/{i}"),
            )
        })
        .collect();
    store.append_audit(first.clone()).await.expect("append");
    store
        .append_audit(vec![entry(T0, "anonymous", "auth.login", "/a/5")])
        .await
        .expect("append one");
    let listed = list(store, query()).await;
    assert_eq!(
        listed.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(),
        ["/a/5", "/a/4", "/a/3", "/a/2", "/a/1", "/a/0"],
        "newest (last appended) first"
    );
    assert!(
        listed.windows(2).all(|w| w[0].id > w[1].id),
        "ids increase in append order: {:?}",
        listed.iter().map(|e| e.id).collect::<Vec<_>>()
    );
    let mut oldest_first = listed.clone();
    oldest_first.reverse();
    for (stored, sent) in oldest_first.iter().zip(&first) {
        assert_eq!(
            *stored,
            AuditRecord {
                id: stored.id,
                ..sent.clone()
            }
        );
    }
    assert_eq!(
        store
            .list_audit(AuditQuery {
                limit: 2,
                ..query()
            })
            .await
            .expect("limit")
            .len(),
        2
    );
    assert!(store
        .list_audit(AuditQuery {
            limit: 0,
            ..query()
        })
        .await
        .expect("limit 0")
        .is_empty());
}

pub async fn audit_filters_by_actor_action_target_and_time<S: AuditStore + ?Sized>(store: &S) {
    store
        .append_audit(vec![
            entry(
                T0,
                "user:ada@example.com",
                "device.create",
                "/api/v1/devices/d1",
            ),
            entry(
                T0 + 10,
                "user:bob@example.com",
                "device.delete",
                "/api/v1/devices/d1",
            ),
            entry(T0 + 20, "user:ada@example.com", "device", "/api/v1/devices"),
            entry(
                T0 + 30,
                "token:ci (tok_1)",
                "command.create",
                "/api/v1/devices/d2/commands",
            ),
            entry(
                T0 + 40,
                "user:ada@example.com",
                "devices.list",
                "/api/v1/devices",
            ),
            entry(
                T0 + 50,
                "user:ada@example.com.evil",
                "auth.login",
                "/api/v1/login",
            ),
        ])
        .await
        .expect("append");
    let actor = |a: &str| AuditQuery {
        actor: Some(a.to_owned()),
        ..query()
    };
    let action = |a: &str| AuditQuery {
        action: Some(a.to_owned()),
        ..query()
    };
    let at = |q: AuditQuery| async move {
        list(store, q)
            .await
            .into_iter()
            .map(|e| e.at_ms - T0)
            .collect::<Vec<_>>()
    };
    // Actor: exact.
    assert_eq!(at(actor("user:ada@example.com")).await, [40, 20, 0]);
    assert_eq!(at(actor("user:ada")).await, Vec::<u64>::new());
    // Action: exact, or a prefix when it ends with '.'.
    assert_eq!(at(action("device.create")).await, [0]);
    assert_eq!(at(action("device")).await, [20]);
    assert_eq!(
        at(action("device.")).await,
        [10, 0],
        "not `device` nor `devices.`"
    );
    assert_eq!(at(action("auth.")).await, [50]);
    assert_eq!(
        at(action("device.c")).await,
        Vec::<u64>::new(),
        "no '.': exact"
    );
    // Target: prefix.
    let target = |t: &str| AuditQuery {
        target_prefix: Some(t.to_owned()),
        ..query()
    };
    assert_eq!(at(target("/api/v1/devices/")).await, [30, 10, 0]);
    assert_eq!(at(target("/api/v1/devices")).await, [40, 30, 20, 10, 0]);
    assert_eq!(at(target("")).await.len(), 6);
    // Time: since inclusive, until exclusive.
    let window = |since: Option<u64>, until: Option<u64>| AuditQuery {
        since_ms: since.map(|s| T0 + s),
        until_ms: until.map(|u| T0 + u),
        ..query()
    };
    assert_eq!(at(window(Some(10), Some(30))).await, [20, 10]);
    assert_eq!(at(window(Some(45), None)).await, [50]);
    assert_eq!(at(window(None, Some(10))).await, [0]);
    assert_eq!(
        at(AuditQuery {
            until_ms: Some(u64::MAX),
            since_ms: Some(0),
            ..query()
        })
        .await
        .len(),
        6,
        "bounds beyond the storable range are no bounds"
    );
    // Filters combine.
    assert_eq!(
        at(AuditQuery {
            actor: Some("user:ada@example.com".into()),
            action: Some("device.".into()),
            target_prefix: Some("/api/v1/devices/".into()),
            since_ms: Some(T0),
            until_ms: Some(T0 + 100),
            ..query()
        })
        .await,
        [0]
    );
}

pub async fn audit_target_and_action_prefixes_match_literally<S: AuditStore + ?Sized>(store: &S) {
    store
        .append_audit(vec![
            entry(T0, "a", "x.1", "/files/100%_done"),
            entry(T0, "a", "x.2", "/files/100%xdone"),
            entry(T0, "a", "x.3", "/files/100abc"),
            entry(T0, "a", "x.4", "/files/a_b"),
            entry(T0, "a", "x.5", "/files/axb"),
            entry(T0, "a", "x.6", "/FILES/a_b"),
            entry(T0, "a", "x.7", "/files/a\\b"),
            entry(T0, "a", "x.8", "/files/ä/ö"),
            entry(T0, "a", "X.9", "/files/\u{10FFFF}"),
            entry(T0, "a", "x%.10", "/files/\u{10FFFF}\u{10FFFF}"),
        ])
        .await
        .expect("append");
    let target = |t: &str| AuditQuery {
        target_prefix: Some(t.to_owned()),
        ..query()
    };
    let actions = |q: AuditQuery| async move {
        list(store, q)
            .await
            .into_iter()
            .map(|e| e.action)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        actions(target("/files/100%_")).await,
        ["x.1"],
        "'%' and '_' are plain"
    );
    assert_eq!(actions(target("/files/100%")).await, ["x.2", "x.1"]);
    assert_eq!(actions(target("/files/a_")).await, ["x.4"]);
    assert_eq!(
        actions(target("/files/a\\")).await,
        ["x.7"],
        "'\\' is plain"
    );
    assert_eq!(
        actions(target("/files/A")).await,
        Vec::<String>::new(),
        "case matters"
    );
    assert_eq!(actions(target("/FILES/")).await, ["x.6"]);
    assert_eq!(actions(target("/files/ä")).await, ["x.8"]);
    assert_eq!(actions(target("/files/\u{10FFFF}")).await, ["x%.10", "X.9"]);
    assert_eq!(
        actions(target("/files/\u{10FFFF}\u{10FFFF}")).await,
        ["x%.10"]
    );
    let action = |a: &str| AuditQuery {
        action: Some(a.to_owned()),
        ..query()
    };
    assert_eq!(
        actions(action("x.")).await.len(),
        8,
        "not `X.9` nor `x%.10`"
    );
    assert_eq!(actions(action("X.")).await, ["X.9"]);
    assert_eq!(actions(action("x%.")).await, ["x%.10"]);
    assert_eq!(actions(action("_.")).await, Vec::<String>::new());
}

pub async fn audit_cursor_pages_through_everything_once<S: AuditStore + ?Sized>(store: &S) {
    for batch in 0..3u64 {
        let entries = (0..7u64)
            .map(|i| {
                let n = batch * 7 + i;
                let actor = if n % 3 == 0 { "even" } else { "odd" };
                entry(T0 + n, actor, "device.update", &format!("/d/{n}"))
            })
            .collect();
        store.append_audit(entries).await.expect("append");
    }
    for (actor, expected) in [(None, 21), (Some("even"), 7)] {
        let mut seen = Vec::new();
        let mut before_id = None;
        loop {
            let page = list(
                store,
                AuditQuery {
                    actor: actor.map(str::to_owned),
                    before_id,
                    limit: 4,
                    ..query()
                },
            )
            .await;
            assert!(page.len() <= 4);
            let Some(last) = page.last() else { break };
            before_id = Some(last.id);
            seen.extend(page.into_iter().map(|e| e.at_ms - T0));
        }
        assert_eq!(seen.len(), expected, "{actor:?}");
        assert!(
            seen.windows(2).all(|w| w[0] > w[1]),
            "newest first, each once: {seen:?}"
        );
    }
    assert_eq!(
        targets(
            store,
            AuditQuery {
                before_id: Some(1),
                ..query()
            }
        )
        .await,
        Vec::<String>::new()
    );
    assert_eq!(
        targets(
            store,
            AuditQuery {
                before_id: Some(u64::MAX),
                limit: 1,
                ..query()
            }
        )
        .await,
        ["/d/20"]
    );
}

pub async fn audit_prune_deletes_old_entries_in_chunks<S: AuditStore + ?Sized>(store: &S) {
    let entries = (0..10u64)
        .map(|i| entry(T0 + i, "a", "device.update", &format!("/d/{i}")))
        .collect();
    store.append_audit(entries).await.expect("append");
    // An old entry appended late is pruned by its time too.
    store
        .append_audit(vec![entry(T0 - 1, "a", "auth.login", "/late")])
        .await
        .expect("append late");
    let mut pruned = Vec::new();
    loop {
        let n = store.prune_audit(T0 + 7, 3).await.expect("prune");
        assert!(n <= 3, "at most max_rows per call, got {n}");
        if n == 0 {
            break;
        }
        pruned.push(n);
    }
    assert_eq!(pruned.iter().sum::<u64>(), 8, "{pruned:?}");
    assert_eq!(targets(store, query()).await, ["/d/9", "/d/8", "/d/7"]);
    assert_eq!(store.prune_audit(u64::MAX, 0).await.expect("max_rows 0"), 0);
    assert_eq!(store.prune_audit(u64::MAX, 100).await.expect("all"), 3);
    assert!(list(store, query()).await.is_empty());
}

/// Whatever a request carries (U+0000 in its path included) is stored and read back exactly,
/// and never fails the append it shares with other entries.
pub async fn audit_text_round_trips_exactly<S: AuditStore + ?Sized>(store: &S) {
    let odd = AuditRecord {
        actor: "user:a\u{0}b@example.com".into(),
        action: "device.\u{0}".into(),
        target: "/api/v1/devices/\u{0}x".into(),
        source: "[2001:db8::1]:443".into(),
        node: "node-ü".into(),
        status: 403,
        detail: "refused: \"quotes\" 'and' \\ newline\n \u{0} 日本".into(),
        ..entry(T0, "", "", "")
    };
    let plain = entry(
        T0 + 1,
        "user:ada@example.com",
        "device.create",
        "/api/v1/devices/d1",
    );
    store
        .append_audit(vec![odd.clone(), plain.clone()])
        .await
        .expect("append");
    let listed = list(store, query()).await;
    assert_eq!(listed.len(), 2);
    assert_eq!(
        listed[1],
        AuditRecord {
            id: listed[1].id,
            ..odd.clone()
        }
    );
    assert_eq!(
        listed[0],
        AuditRecord {
            id: listed[0].id,
            ..plain
        }
    );
    let by = |q: AuditQuery| async move {
        list(store, q)
            .await
            .into_iter()
            .map(|e| e.id)
            .collect::<Vec<_>>()
    };
    let odd_id = vec![listed[1].id];
    assert_eq!(
        by(AuditQuery {
            actor: Some(odd.actor.clone()),
            ..query()
        })
        .await,
        odd_id
    );
    assert_eq!(
        by(AuditQuery {
            actor: Some("user:a".into()),
            ..query()
        })
        .await,
        Vec::<u64>::new(),
        "no match on the part before U+0000"
    );
    assert_eq!(
        by(AuditQuery {
            action: Some(odd.action.clone()),
            ..query()
        })
        .await,
        odd_id
    );
    assert_eq!(
        by(AuditQuery {
            target_prefix: Some("/api/v1/devices/\u{0}".into()),
            ..query()
        })
        .await,
        odd_id
    );
}
