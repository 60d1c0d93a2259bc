//! Conformance cases for [`RuleStore`](crate::RuleStore): rules with a bound and unique names;
//! alerts open once per (rule, device), their lifecycle, listing and pruning.

use super::*;
use crate::{
    AlertFilter, AlertFire, AlertState, RuleRecord, TicketCreate, TicketFilter, TicketRecord,
};

fn rule(id: &str, name: &str) -> RuleRecord {
    RuleRecord {
        id: id.to_owned(),
        name: name.to_owned(),
        when: "battery < 15".to_owned(),
        selector: Some("tag:hw=rev-b".to_owned()),
        scope: None,
        then: "alert:warning".to_owned(),
        enabled: true,
        created_by: "admin".to_owned(),
        created_at_ms: 1_000,
        updated_at_ms: 1_000,
    }
}

fn fire(id: &str, rule_id: &str, device: &str, at_ms: u64) -> AlertFire {
    AlertFire {
        id: id.to_owned(),
        rule_id: rule_id.to_owned(),
        rule_name: format!("name-{rule_id}"),
        device_id: device.to_owned(),
        severity: "warning".to_owned(),
        detail: format!("battery = {at_ms}"),
        at_ms,
        rule_must_exist: false,
    }
}

pub async fn rules_are_bounded_unique_by_name_and_deleted_with_their_open_alerts(
    store: &dyn Store,
) {
    assert!(store
        .create_rule(rule("r1", "low-battery"), 2)
        .await
        .expect("create"));
    let dup = store.create_rule(rule("r2", "low-battery"), 2).await;
    assert!(matches!(dup, Err(StoreError::AlreadyExists(_))), "{dup:?}");
    assert!(store
        .create_rule(rule("r2", "hot"), 2)
        .await
        .expect("create"));
    assert!(!store
        .create_rule(rule("r3", "cold"), 2)
        .await
        .expect("bound"));
    let names: Vec<String> = store
        .list_rules()
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["hot", "low-battery"]);
    assert_eq!(
        store.get_rule("r1").await.expect("get"),
        Some(rule("r1", "low-battery"))
    );
    let off = store
        .set_rule_enabled("r1", false, 2_000)
        .await
        .expect("disable");
    assert_eq!(
        off.as_ref().map(|r| (r.enabled, r.updated_at_ms)),
        Some((false, 2_000))
    );
    assert_eq!(
        store
            .set_rule_enabled("nope", false, 2_000)
            .await
            .expect("none"),
        None
    );

    store
        .fire_alert(fire("a1", "r1", "d1", 3_000), 10)
        .await
        .expect("fire");
    assert!(store.delete_rule("r1", 4_000).await.expect("delete"));
    assert!(!store.delete_rule("r1", 4_000).await.expect("gone"));
    let a = store.get_alert("a1").await.expect("get").expect("kept");
    assert_eq!(a.state, AlertState::Resolved);
    assert_eq!(a.resolved_by.as_deref(), Some("rule_deleted"));
    assert_eq!(a.resolved_at_ms, Some(4_000));
}

pub async fn alerts_open_once_per_rule_and_device_and_follow_their_lifecycle(store: &dyn Store) {
    let (a, new) = store
        .fire_alert(fire("a1", "r1", "d1", 1_000), 3)
        .await
        .expect("fire")
        .expect("stored");
    assert!(new);
    assert_eq!(
        (a.state, a.count, a.first_fired_ms),
        (AlertState::Firing, 1, 1_000)
    );
    // Again while open: the same alert, one more occurrence.
    let (a, new) = store
        .fire_alert(fire("a2", "r1", "d1", 2_000), 3)
        .await
        .expect("fire")
        .expect("stored");
    assert!(!new);
    assert_eq!((a.id.as_str(), a.count, a.last_fired_ms), ("a1", 2, 2_000));
    assert_eq!(a.detail, "battery = 2000");
    // Acknowledged, it still counts occurrences; resolved, the next firing is a new alert.
    let a = store
        .acknowledge_alert("a1", "ops", 2_500)
        .await
        .expect("ack")
        .expect("a1");
    assert_eq!(a.state, AlertState::Acknowledged);
    assert_eq!(a.acknowledged_by.as_deref(), Some("ops"));
    let again = store
        .acknowledge_alert("a1", "other", 2_600)
        .await
        .expect("ack")
        .expect("a1");
    assert_eq!(again.acknowledged_by.as_deref(), Some("ops"), "unchanged");
    let (a, new) = store
        .fire_alert(fire("a3", "r1", "d1", 3_000), 3)
        .await
        .expect("fire")
        .expect("stored");
    assert!(!new);
    assert_eq!(
        (a.id.as_str(), a.count, a.state),
        ("a1", 3, AlertState::Acknowledged)
    );
    let a = store
        .resolve_open_alert("r1", "d1", "auto", 4_000)
        .await
        .expect("resolve")
        .expect("open");
    assert_eq!(
        (a.state, a.resolved_by.as_deref()),
        (AlertState::Resolved, Some("auto"))
    );
    assert_eq!(
        store
            .resolve_open_alert("r1", "d1", "auto", 4_100)
            .await
            .expect("none"),
        None
    );
    let resolved = store
        .resolve_alert("a1", "ops", 5_000)
        .await
        .expect("resolve")
        .expect("a1");
    assert_eq!(
        resolved.resolved_at_ms,
        Some(4_000),
        "a resolved alert stays as it was"
    );
    let (a, new) = store
        .fire_alert(fire("a4", "r1", "d1", 6_000), 3)
        .await
        .expect("fire")
        .expect("stored");
    assert!(new);
    assert_eq!(a.id, "a4");

    // The bound counts open alerts only.
    store
        .fire_alert(fire("a5", "r1", "d2", 6_000), 3)
        .await
        .expect("fire")
        .expect("stored");
    store
        .fire_alert(fire("a6", "r2", "d1", 6_000), 3)
        .await
        .expect("fire")
        .expect("stored");
    assert_eq!(
        store
            .fire_alert(fire("a7", "r2", "d2", 6_000), 3)
            .await
            .expect("full"),
        None
    );

    // Lists: newest first, by state, rule, device, with a cursor.
    let ids = |v: Vec<crate::AlertRecord>| v.into_iter().map(|a| a.id).collect::<Vec<_>>();
    let all = AlertFilter::default();
    assert_eq!(
        ids(store.list_alerts(&all, 10, None).await.expect("list")),
        ["a6", "a5", "a4", "a1"]
    );
    assert_eq!(
        ids(store.list_alerts(&all, 2, Some("a5")).await.expect("page")),
        ["a4", "a1"]
    );
    let firing = AlertFilter {
        state: Some(AlertState::Firing),
        rule_id: Some("r1".into()),
        ..AlertFilter::default()
    };
    assert_eq!(
        ids(store.list_alerts(&firing, 10, None).await.expect("list")),
        ["a5", "a4"]
    );
    let d1 = AlertFilter {
        device_id: Some("d1".into()),
        ..AlertFilter::default()
    };
    assert_eq!(
        ids(store.list_alerts(&d1, 10, None).await.expect("list")),
        ["a6", "a4", "a1"]
    );

    let open = AlertFilter {
        open: true,
        ..AlertFilter::default()
    };
    assert_eq!(
        ids(store.list_alerts(&open, 10, None).await.expect("list")),
        ["a6", "a5", "a4"]
    );

    // Pruning removes resolved alerts only.
    store
        .resolve_alert("a5", "ops", 7_000)
        .await
        .expect("resolve");
    assert_eq!(
        store.prune_alerts(4_500, 100).await.expect("prune"),
        1,
        "a1, resolved at 4000"
    );
    assert_eq!(
        store.prune_alerts(0, 0).await.expect("prune"),
        1,
        "a5: beyond keep_max, resolved"
    );
    assert_eq!(
        ids(store.list_alerts(&all, 10, None).await.expect("list")),
        ["a6", "a4"]
    );
}

pub async fn a_rules_alert_needs_its_rule_enabled(store: &dyn Store) {
    let must = |id: &str, rule: &str| AlertFire {
        rule_must_exist: true,
        ..fire(id, rule, "d1", 1_000)
    };
    let none = store.fire_alert(must("a1", "r1"), 10).await.expect("fire");
    assert_eq!(none, None, "no rule r1");
    assert!(store
        .create_rule(rule("r1", "low"), 10)
        .await
        .expect("create"));
    assert!(store
        .fire_alert(must("a1", "r1"), 10)
        .await
        .expect("fire")
        .is_some());
    store
        .set_rule_enabled("r1", false, 2_000)
        .await
        .expect("disable");
    store
        .resolve_open_alert("r1", "d1", "auto", 2_000)
        .await
        .expect("resolve");
    let none = store.fire_alert(must("a2", "r1"), 10).await.expect("fire");
    assert_eq!(none, None, "disabled");
    // Without the requirement (the cohort sweeper's alerts have no rule row).
    let cohort = store
        .fire_alert(fire("a3", "cohort:x", "", 3_000), 10)
        .await;
    assert!(cohort.expect("fire").is_some());
}

fn ticket(id: &str, playbook: &str, alert: &str) -> TicketRecord {
    TicketRecord {
        id: id.to_owned(),
        playbook: playbook.to_owned(),
        alert_id: alert.to_owned(),
        title: format!("{playbook}: {alert}"),
        open: true,
        created_at_ms: 1_000,
        closed_at_ms: None,
        closed_by: None,
        body: format!("{{\"devices\":[\"{id}\"]}}"),
    }
}

pub async fn tickets_open_once_by_id_bounded_close_list_and_prune(store: &dyn Store) {
    let t1 = ticket("t1", "visit", "a1");
    assert_eq!(
        store.create_ticket(t1.clone(), 2).await.expect("store"),
        TicketCreate::Created
    );
    // The same id again (a retried playbook) changes nothing.
    let mut again = ticket("t1", "other", "a9");
    again.body = "{}".to_owned();
    assert_eq!(
        store.create_ticket(again, 2).await.expect("store"),
        TicketCreate::Exists
    );
    assert_eq!(
        store.get_ticket("t1").await.expect("store"),
        Some(t1.clone())
    );
    assert_eq!(
        store
            .create_ticket(ticket("t2", "visit", "a2"), 2)
            .await
            .expect("store"),
        TicketCreate::Created
    );
    // Two of `visit` open: the bound refuses a third of it, not another playbook's.
    assert_eq!(
        store
            .create_ticket(ticket("t9", "visit", "a9"), 2)
            .await
            .expect("store"),
        TicketCreate::Full
    );
    assert_eq!(store.get_ticket("t9").await.expect("store"), None);

    let closed = store
        .close_ticket("t1", "ops@example.com", 5_000)
        .await
        .expect("store")
        .expect("store");
    assert!(!closed.open);
    assert_eq!(closed.closed_at_ms, Some(5_000));
    assert_eq!(closed.closed_by.as_deref(), Some("ops@example.com"));
    // Closing again returns it unchanged.
    let twice = store
        .close_ticket("t1", "someone", 9_000)
        .await
        .expect("store")
        .expect("store");
    assert_eq!(twice, closed);
    assert_eq!(
        store.close_ticket("nope", "x", 1).await.expect("store"),
        None
    );
    // Another playbook has a bound of its own.
    assert_eq!(
        store
            .create_ticket(ticket("t3", "batteries", "a3"), 2)
            .await
            .expect("store"),
        TicketCreate::Created
    );

    let ids = |v: Vec<TicketRecord>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
    let all = TicketFilter::default();
    assert_eq!(
        ids(store.list_tickets(&all, 10, None).await.expect("store")),
        ["t3", "t2", "t1"]
    );
    assert_eq!(
        ids(store
            .list_tickets(&all, 1, Some("t3"))
            .await
            .expect("store")),
        ["t2"]
    );
    let open = TicketFilter {
        open: Some(true),
        ..TicketFilter::default()
    };
    assert_eq!(
        ids(store.list_tickets(&open, 10, None).await.expect("store")),
        ["t3", "t2"]
    );
    let shut = TicketFilter {
        open: Some(false),
        ..TicketFilter::default()
    };
    assert_eq!(
        ids(store.list_tickets(&shut, 10, None).await.expect("store")),
        ["t1"]
    );
    let visit = TicketFilter {
        playbook: Some("visit".to_owned()),
        ..TicketFilter::default()
    };
    assert_eq!(
        ids(store.list_tickets(&visit, 10, None).await.expect("store")),
        ["t2", "t1"]
    );
    let of_a3 = TicketFilter {
        alert_id: Some("a3".to_owned()),
        ..TicketFilter::default()
    };
    assert_eq!(
        ids(store.list_tickets(&of_a3, 10, None).await.expect("store")),
        ["t3"]
    );

    // Pruning never deletes an open ticket, and deletes closed ones that are old or beyond
    // the newest kept.
    assert_eq!(store.prune_tickets(1_000, 1).await.expect("store"), 1);
    assert_eq!(
        ids(store.list_tickets(&all, 10, None).await.expect("store")),
        ["t3", "t2"]
    );
    store.close_ticket("t3", "ops", 6_000).await.expect("store");
    assert_eq!(store.prune_tickets(0, 10).await.expect("store"), 0);
    assert_eq!(store.prune_tickets(7_000, 10).await.expect("store"), 1);
    assert_eq!(
        ids(store.list_tickets(&all, 10, None).await.expect("store")),
        ["t2"]
    );
}
