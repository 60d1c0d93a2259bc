//! Routing through the subscription index, seen by real clients: one delivery per session at the
//! highest granted QoS, v5 options, `$` topics, and index entries removed with the subscription
//! or session (unsubscribe, end, expiry, clean start) so nothing is routed or kept afterwards.

mod support;

use mooring_broker::test_support::AllowAll;
use mooring_broker::{Broker, BrokerConfig, Message};
use mqtt_protocol_core::mqtt::packet::{GenericPacket, SubOpts};
use mqtt_protocol_core::mqtt::result_code::DisconnectReasonCode;
use std::sync::Arc;
use support::*;

/// After `c` got everything routed to it before, `marker` arrives next: proves nothing else did.
async fn assert_next_is_marker(broker: &Broker, c: &mut RawClient, marker: &str) {
    broker.publish(Message::new(marker, "marker", 0, false));
    let p = c.next_publish().await;
    assert_eq!(
        (p.0.as_str(), p.1.as_str()),
        (marker, "marker"),
        "unexpected {p:?}"
    );
}

#[tokio::test]
async fn overlapping_filters_deliver_once_at_the_highest_granted_qos() {
    let (broker, _) = broker();
    for v5 in [false, true] {
        let mut sub = RawClient::open(&broker, v5);
        sub.connect("overlap").await;
        sub.subscribe("s/+/t", 0).await;
        sub.subscribe("s/#", 1).await;
        sub.subscribe("s/a/t", 0).await;
        sub.subscribe("marker", 0).await;
        let mut publisher = RawClient::open(&broker, v5);
        publisher.connect("overlap-pub").await;
        publisher.publish("s/a/t", "hello", 2, false).await;
        let p = sub.next_publish().await;
        assert_eq!((p.0.as_str(), p.1.as_str(), p.2), ("s/a/t", "hello", 1));
        assert_next_is_marker(&broker, &mut sub, "marker").await;
        // Capped by the message's own QoS.
        publisher.publish("s/b/t", "low", 0, false).await;
        assert_eq!(sub.next_publish().await.2, 0);
        sub.disconnect().await;
        publisher.disconnect().await;
        wait_for("sessions gone", || broker.stats().sessions == 0).await;
    }
}

#[tokio::test]
async fn no_local_and_retain_as_published_apply_per_filter() {
    let (broker, _) = broker();
    let mut c = RawClient::open(&broker, true);
    c.connect("self").await;
    c.subscribe_opts("n/#", SubOpts::new().set_nl(true)).await;
    c.subscribe("marker", 0).await;
    // Own message on a no-local filter: not delivered.
    c.publish("n/x", "mine", 0, false).await;
    assert_next_is_marker(&broker, &mut c, "marker").await;
    // Another client's message on it: delivered.
    let mut other = RawClient::open(&broker, true);
    other.connect("other").await;
    other.publish("n/x", "theirs", 0, false).await;
    assert_eq!(c.next_publish().await.1, "theirs");
    // A second, local filter matching the same topic: own messages come back, once.
    c.subscribe("n/+", 0).await;
    c.publish("n/y", "mine again", 0, false).await;
    assert_eq!(c.next_publish().await.1, "mine again");
    assert_next_is_marker(&broker, &mut c, "marker").await;

    // Retain-as-published keeps RETAIN on live deliveries; otherwise it is cleared.
    let mut rap = RawClient::open(&broker, true);
    rap.connect("rap").await;
    rap.subscribe_opts("r/a", SubOpts::new().set_rap(true))
        .await;
    rap.subscribe("r/b", 0).await;
    other.publish("r/a", "kept flag", 0, true).await;
    other.publish("r/b", "cleared flag", 0, true).await;
    let a = rap.next_publish().await;
    let b = rap.next_publish().await;
    assert_eq!((a.1.as_str(), a.3), ("kept flag", true));
    assert_eq!((b.1.as_str(), b.3), ("cleared flag", false));
}

#[tokio::test]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let (broker, _) = broker();
    let mut c = RawClient::open(&broker, false);
    c.connect("dollar").await;
    c.subscribe("#", 0).await;
    c.subscribe("+/x", 0).await;
    broker.publish(Message::new("$SYS/x", "hidden", 0, false));
    assert_next_is_marker(&broker, &mut c, "m/x").await;
    c.subscribe("$SYS/#", 0).await;
    broker.publish(Message::new("$SYS/x", "seen", 0, false));
    assert_eq!(c.next_publish().await.1, "seen");
}

#[tokio::test]
async fn unsubscribe_and_session_end_remove_every_index_entry() {
    let (broker, _) = broker();
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut c = RawClient::open(&broker, i % 2 == 0);
        c.connect(&format!("c{i}")).await;
        c.subscribe(&format!("devices/c{i}/commands/+"), 1).await;
        c.subscribe("fleet/#", 0).await;
        c.subscribe("marker", 0).await;
        clients.push(c);
    }
    assert_eq!(broker.stats().subscriptions, 60);
    for c in &mut clients {
        c.unsubscribe("fleet/#").await;
    }
    assert_eq!(broker.stats().subscriptions, 40);
    broker.publish(Message::new("fleet/all", "not for you", 0, false));
    broker.publish(Message::new("marker", "marker", 0, false));
    for c in &mut clients {
        let p = c.next_publish().await;
        assert_eq!(p.0, "marker", "unexpected {p:?}");
    }
    // Unsubscribing what is not held changes nothing.
    clients[0].unsubscribe("fleet/#").await;
    assert_eq!(broker.stats().subscriptions, 40);
    for c in &mut clients {
        c.disconnect().await;
    }
    wait_for("every session and subscription gone", || {
        let s = broker.stats();
        s.sessions == 0 && s.subscriptions == 0
    })
    .await;
}

#[tokio::test]
async fn abnormal_close_of_a_clean_session_removes_its_subscriptions() {
    let (broker, _) = broker();
    let mut c = RawClient::open(&broker, false);
    c.connect("dropped").await;
    c.subscribe("a/#", 1).await;
    assert_eq!(broker.stats().subscriptions, 1);
    drop(c);
    wait_for("session and subscription gone", || {
        let s = broker.stats();
        s.sessions == 0 && s.subscriptions == 0
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn session_expiry_removes_its_subscriptions() {
    let (broker, _) = broker();
    let mut c = RawClient::open(&broker, true);
    c.connect_with("expiring", false, 0, None, 2).await;
    c.subscribe("a/#", 1).await;
    c.disconnect().await;
    wait_for("offline", || {
        broker
            .session_info("expiring")
            .is_some_and(|s| !s.connected)
    })
    .await;
    assert_eq!(
        broker.stats().subscriptions,
        1,
        "kept while the session lives"
    );
    wait_for("expired", || {
        let s = broker.stats();
        s.sessions == 0 && s.subscriptions == 0
    })
    .await;
}

#[tokio::test]
async fn clean_start_replaces_the_session_and_its_subscriptions() {
    let (broker, _) = broker();
    let mut c = RawClient::open(&broker, true);
    c.connect_with("phoenix", false, 0, None, 300).await;
    c.subscribe("old/#", 1).await;
    // Takeover without clean start keeps the session and its subscription.
    let mut again = RawClient::open(&broker, true);
    again.connect_with("phoenix", false, 0, None, 300).await;
    assert!(matches!(
        c.recv().await,
        Some(GenericPacket::V5_0Disconnect(_))
    ));
    assert_eq!(broker.stats().subscriptions, 1);
    // Takeover with clean start: a new session; the old subscription is gone.
    let mut fresh = RawClient::open(&broker, true);
    fresh.connect("phoenix").await;
    assert!(matches!(
        again.recv().await,
        Some(GenericPacket::V5_0Disconnect(_))
    ));
    fresh.subscribe("new/#", 1).await;
    assert_eq!(broker.stats().subscriptions, 1);
    broker.publish(Message::new("old/x", "stale", 1, false));
    broker.publish(Message::new("new/x", "current", 1, false));
    assert_eq!(fresh.next_publish().await.1, "current");
    fresh.disconnect().await;
    wait_for("all gone", || {
        let s = broker.stats();
        s.sessions == 0 && s.subscriptions == 0
    })
    .await;
}

#[tokio::test]
async fn retained_messages_are_found_by_prefix_and_by_wildcards() {
    let (broker, _) = broker();
    for (t, p) in [
        ("devices/d1/shadow/delta", "d1"),
        ("devices/d10/shadow/delta", "d10"),
        ("devices/d1", "parent"),
        ("$SYS/load", "sys"),
    ] {
        broker.publish(Message::new(t, p, 0, true));
    }
    let cases: [(&str, &[&str]); 6] = [
        ("devices/d1/shadow/delta", &["d1"]),
        ("devices/d1/#", &["d1", "parent"]),
        ("devices/+/shadow/delta", &["d1", "d10"]),
        ("#", &["d1", "d10", "parent"]),
        ("$SYS/#", &["sys"]),
        ("devices/d1/shadow/delta/#", &["d1"]),
    ];
    for (i, (filter, want)) in cases.iter().enumerate() {
        let mut c = RawClient::open(&broker, false);
        c.connect(&format!("r{i}")).await;
        c.subscribe(filter, 0).await;
        let mut got = Vec::new();
        for _ in 0..want.len() {
            got.push(c.next_publish().await.1);
        }
        got.sort();
        assert_eq!(got, want.to_vec(), "filter {filter}");
        c.subscribe("marker", 0).await;
        assert_next_is_marker(&broker, &mut c, "marker").await;
    }
}

#[tokio::test]
async fn kick_device_closes_only_that_devices_connections() {
    let broker = Broker::new(
        BrokerConfig::default(),
        Arc::new(AllowAll::new().as_devices()),
    );
    let mut d1a = RawClient::open(&broker, true);
    d1a.connect("d1.a").await;
    let mut d1b = RawClient::open(&broker, true);
    d1b.connect("d1.b").await;
    let mut d2 = RawClient::open(&broker, true);
    d2.connect("d2.a").await;
    broker.kick_device("d1");
    for c in [&mut d1a, &mut d1b] {
        match c.recv().await {
            Some(GenericPacket::V5_0Disconnect(d)) => assert_eq!(
                d.reason_code(),
                Some(DisconnectReasonCode::AdministrativeAction)
            ),
            other => panic!("expected DISCONNECT 0x98, got {other:?}"),
        }
        assert!(c.recv().await.is_none(), "closed");
    }
    assert!(d2.ping().await.is_some(), "other device untouched");
    broker.kick_device("nobody");
    assert!(d2.ping().await.is_some());
}
