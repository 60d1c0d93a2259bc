//! Ownership and bounds of broker state, on in-memory streams and tokio's paused clock: who may
//! use a session, quotas per principal, retained accounting, and peers that stop reading.

mod support;

use mooring_broker::{
    Broker, BrokerConfig, Enqueue, KickReason, Message, Principal, PrincipalKey, Refusal,
};
use mqtt_protocol_core::mqtt::packet::GenericPacket;
use mqtt_protocol_core::mqtt::result_code::{
    ConnectReasonCode, DisconnectReasonCode, PubackReasonCode, SubackReasonCode,
};
use std::collections::BTreeMap;
use std::time::Duration;
use support::principals::*;
use support::*;
use tokio::time::Instant;

#[tokio::test]
async fn a_client_id_belongs_to_the_principal_that_made_the_session() {
    let broker = broker_with_principals(BrokerConfig::default());
    let mut a = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut a, "svc:a", "shared", true, 0).await,
        ConnectReasonCode::Success
    );
    a.subscribe("t/#", 0).await;
    // Another service with the same client id: refused, and `a` is not kicked.
    let mut b = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut b, "svc:b", "shared", true, 0).await,
        ConnectReasonCode::ClientIdentifierNotValid
    );
    assert!(a.ping().await.is_some(), "owner still connected");
    // A device and a dev-listener client with that id live in other namespaces: no conflict.
    let mut d = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut d, "dev:shared", "shared", true, 0).await,
        ConnectReasonCode::Success
    );
    let mut anon = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut anon, "", "shared", true, 0).await,
        ConnectReasonCode::Success
    );
    assert!(a.ping().await.is_some() && d.ping().await.is_some());
    // Server messages for the device reach the device's session only.
    d.subscribe("devices/shared/#", 1).await;
    a.subscribe("devices/#", 1).await;
    anon.subscribe("devices/#", 1).await;
    assert_eq!(
        broker.publish_to_device("shared", Message::new("devices/shared/c", "x", 1, false)),
        Enqueue::Enqueued
    );
    assert_eq!(d.next_publish().await.0, "devices/shared/c");
    a.subscribe("marker", 0).await;
    a.publish("marker", "m", 0, false).await;
    assert_eq!(
        a.next_publish().await.0,
        "marker",
        "service got nothing else"
    );
    assert_eq!(broker.stats().refused(Refusal::ClientIdInUse), 1);
}

#[tokio::test]
async fn persistent_sessions_are_capped_per_principal_but_never_for_devices() {
    let broker = broker_with_principals(BrokerConfig {
        persistent_sessions_per_principal_max: 2,
        sessions_max: 3,
        ..BrokerConfig::default()
    });
    for i in 0..2 {
        let mut c = RawClient::open(&broker, true);
        assert_eq!(
            connect_as(&mut c, "svc:a", &format!("p{i}"), false, 600).await,
            ConnectReasonCode::Success
        );
        c.disconnect().await;
    }
    let mut c = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut c, "svc:a", "p2", false, 600).await,
        ConnectReasonCode::QuotaExceeded
    );
    // Resuming one of its own is fine; another service has its own quota.
    let mut c = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut c, "svc:a", "p0", false, 600).await,
        ConnectReasonCode::Success
    );
    let mut other = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut other, "svc:b", "q0", false, 600).await,
        ConnectReasonCode::Success
    );
    // sessions_max (3) counts services and dev clients only: now full for them...
    let mut full = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut full, "svc:c", "r0", true, 0).await,
        ConnectReasonCode::QuotaExceeded
    );
    // ...while devices are always admitted.
    for i in 0..10 {
        let mut d = RawClient::open(&broker, true);
        assert_eq!(
            connect_as(&mut d, &format!("dev:d{i}"), &format!("d{i}"), false, 600).await,
            ConnectReasonCode::Success
        );
    }
    let s = broker.stats();
    assert_eq!(s.refused(Refusal::SessionQuota), 1);
    assert_eq!(s.refused(Refusal::SessionsFull), 1);
}

#[tokio::test]
async fn retained_quotas_are_per_principal_and_freed_by_deletes_and_never_refuse_the_server() {
    let broker = broker_with_principals(BrokerConfig {
        retained_per_principal_max: 2,
        retained_bytes_per_principal_max: 100,
        retained_bytes_max: 150,
        ..BrokerConfig::default()
    });
    let mut d = RawClient::open(&broker, true);
    connect_as(&mut d, "dev:d1", "d1", true, 0).await;
    assert_eq!(publish(&mut d, "devices/d1/a", "1").await, None);
    assert_eq!(publish(&mut d, "devices/d1/b", "2").await, None);
    assert_eq!(
        publish(&mut d, "devices/d1/c", "3").await,
        Some(PubackReasonCode::QuotaExceeded)
    );
    // Replacing one of its own is within quota; clearing one frees a slot.
    assert_eq!(publish(&mut d, "devices/d1/a", "11").await, None);
    assert_eq!(publish(&mut d, "devices/d1/b", "").await, None);
    assert_eq!(publish(&mut d, "devices/d1/c", "3").await, None);
    // Bytes per principal (topic + payload).
    let big = "x".repeat(90);
    assert_eq!(
        publish(&mut d, "devices/d1/c", &big).await,
        Some(PubackReasonCode::QuotaExceeded)
    );
    // Broker-wide bytes: another device fits up to what is left of 150 bytes.
    let mut d2 = RawClient::open(&broker, true);
    connect_as(&mut d2, "dev:d2", "d2", true, 0).await;
    let s80 = "y".repeat(80);
    assert_eq!(publish(&mut d2, "devices/d2/a", &s80).await, None);
    assert_eq!(
        publish(&mut d2, "devices/d2/b", "z").await,
        Some(PubackReasonCode::QuotaExceeded)
    );
    // The server's own retained messages are never refused.
    for i in 0..5 {
        broker.publish(Message::new(
            format!("devices/d{i}/shadow/delta"),
            "{}",
            1,
            true,
        ));
    }
    assert_eq!(broker.stats().retained, 3 + 5);
    // Removing d1 frees what it owned, and everything under its prefix.
    assert_eq!(broker.remove_device("d1", Some("devices/d1/")), 3);
    assert_eq!(broker.stats().retained, 1 + 4);
    assert_eq!(broker.stats().refused(Refusal::RetainedQuota), 3);
}

#[tokio::test]
async fn a_new_principal_view_revokes_live_and_persisted_subscriptions() {
    let broker = broker_with_principals(BrokerConfig::default());
    let mut d = RawClient::open(&broker, true);
    connect_as(&mut d, "dev:d1@berlin", "d1", false, 600).await;
    d.subscribe("sites/berlin/#", 1).await;
    d.subscribe("devices/d1/x", 1).await;
    let mut tags = BTreeMap::new();
    tags.insert("site".to_string(), "paris".to_string());
    let removed = broker.update_principal(Principal::Device {
        id: mooring_proto::DeviceId::parse("d1").expect("test device id"),
        tags,
    });
    assert_eq!(removed, 1);
    broker.publish(Message::new("sites/berlin/a", "no", 1, false));
    broker.publish(Message::new("devices/d1/x", "yes", 1, false));
    assert_eq!(d.next_publish().await.1, "yes");
    // A session resumed by a principal that may not hold a filter loses it.
    d.subscribe("sites/paris/#", 1).await;
    d.disconnect().await;
    wait_for("offline", || {
        broker.session_info("d1").is_some_and(|i| !i.connected)
    })
    .await;
    let mut again = RawClient::open(&broker, true);
    connect_as(&mut again, "dev:d1@rome", "d1", false, 600).await;
    broker.publish(Message::new("sites/paris/a", "no", 1, false));
    broker.publish(Message::new("devices/d1/x", "yes-again", 1, false));
    assert_eq!(again.next_publish().await.1, "yes-again");
    assert_eq!(broker.stats().refused(Refusal::SubscriptionRevoked), 2);
}

#[tokio::test]
async fn session_queues_are_bounded_in_bytes_dropping_qos0_first() {
    let broker = broker_with_principals(BrokerConfig {
        session_queue_bytes_max: 10 * 1024,
        ..BrokerConfig::default()
    });
    let mut s = RawClient::open(&broker, true);
    connect_as(&mut s, "svc:a", "offline", false, 600).await;
    s.subscribe("t/#", 1).await;
    s.disconnect().await;
    wait_for("offline", || {
        broker.session_info("offline").is_some_and(|i| !i.connected)
    })
    .await;
    let kib = "k".repeat(1024 - 3);
    for _ in 0..20 {
        broker.publish(Message::new("t/1", kib.clone(), 1, false));
    }
    let info = broker.session_info("offline").expect("session");
    assert_eq!(info.queued, 10, "10 KiB of 1 KiB messages");
    assert_eq!(broker.stats().refused(Refusal::QueueFull), 10);
}

/// Opens `id` as a dev client subscribed to `t/#` (QoS 0) that then never reads, and publishes
/// 200 KiB to it so the in-memory pipe (64 KiB) is full and the broker's write is blocked.
async fn stuck_reader(broker: &Broker, id: &str) -> RawClient {
    let mut c = RawClient::open(broker, true);
    connect_as(&mut c, "", id, true, 0).await;
    c.subscribe("t/#", 0).await;
    let payload = "p".repeat(10 * 1024);
    for _ in 0..20 {
        broker.publish(Message::new("t/x", payload.clone(), 0, false));
    }
    c
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_is_closed_after_the_write_stall_timeout() {
    let broker = broker_with_principals(BrokerConfig {
        write_stall_timeout_ms: 30_000,
        ..BrokerConfig::default()
    });
    let _stuck = stuck_reader(&broker, "stuck").await;
    let start = Instant::now();
    wait_until(&broker, |b| b.stats().connections == 0).await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
        "closed after {waited:?} of virtual time"
    );
    assert_eq!(broker.stats().refused(Refusal::WriteStalled), 1);
}

#[tokio::test(start_paused = true)]
async fn takeover_and_kick_act_at_once_while_a_write_is_blocked() {
    let broker = broker_with_principals(BrokerConfig::default());
    let _stuck = stuck_reader(&broker, "stuck").await;
    let start = Instant::now();
    let mut again = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut again, "", "stuck", true, 0).await,
        ConnectReasonCode::Success
    );
    // The old connection's close flush is bounded (close_flush_timeout_ms), not its stall timeout.
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "takeover took {:?}",
        start.elapsed()
    );
    assert_eq!(broker.stats().connections, 1);

    let mut d = RawClient::open(&broker, true);
    connect_as(&mut d, "dev:d9", "d9", true, 0).await;
    d.subscribe("devices/d9/#", 0).await;
    let payload = "p".repeat(10 * 1024);
    for _ in 0..20 {
        broker.publish(Message::new("devices/d9/x", payload.clone(), 0, false));
    }
    let start = Instant::now();
    broker.remove_device("d9", None);
    wait_until(&broker, |b| b.stats().connections == 1).await;
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn keepalive_zero_is_supervised_with_the_server_maximum() {
    let broker = broker_with_principals(BrokerConfig {
        keepalive_secs_max: 10,
        ..BrokerConfig::default()
    });
    for v5 in [false, true] {
        let mut c = RawClient::open(&broker, v5);
        c.connect_with("silent", true, 0, None, 0).await;
        let start = Instant::now();
        while c.recv().await.is_some() {}
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(15) && waited < Duration::from_secs(16),
            "v5={v5}: closed after {waited:?}"
        );
    }
    assert_eq!(broker.stats().refused(Refusal::KeepaliveTimeout), 2);
}

#[tokio::test]
async fn oversized_topics_and_filters_are_refused() {
    let broker = broker_with_principals(BrokerConfig {
        topic_levels_max: 4,
        topic_bytes_max: 64,
        ..BrokerConfig::default()
    });
    let mut c = RawClient::open(&broker, true);
    connect_as(&mut c, "", "c", true, 0).await;
    for filter in ["a/b/c/d/e", &"x".repeat(65)] {
        match c.subscribe(filter, 0).await {
            GenericPacket::V5_0Suback(a) => {
                assert_eq!(a.reason_codes(), vec![SubackReasonCode::TopicFilterInvalid])
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
    match c.subscribe("a/b/c/#", 0).await {
        GenericPacket::V5_0Suback(a) => {
            assert_eq!(a.reason_codes(), vec![SubackReasonCode::GrantedQos0])
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    assert_eq!(broker.stats().subscriptions, 1);
    c.publish("a/b/c/d/e", "x", 1, false).await;
    match c.recv().await {
        Some(GenericPacket::V5_0Puback(a)) => {
            assert_eq!(a.reason_code(), Some(PubackReasonCode::TopicNameInvalid))
        }
        other => panic!("expected PUBACK 0x90, got {other:?}"),
    }
    c.publish("a/b/c/d/e", "x", 0, false).await;
    match c.recv().await {
        Some(GenericPacket::V5_0Disconnect(d)) => {
            assert_eq!(
                d.reason_code(),
                Some(DisconnectReasonCode::TopicNameInvalid)
            )
        }
        other => panic!("expected DISCONNECT 0x90, got {other:?}"),
    }
    assert_eq!(broker.stats().refused(Refusal::TopicTooLong), 4);
}

/// A retained QoS 1 publish; returns the PUBACK reason code (None: success).
async fn publish(c: &mut RawClient, topic: &str, payload: &str) -> Option<PubackReasonCode> {
    c.publish(topic, payload, 1, true).await;
    match c.recv().await {
        Some(GenericPacket::V5_0Puback(a)) => a.reason_code(),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn live_sessions_are_capped_per_principal_too() {
    let broker = broker_with_principals(BrokerConfig {
        sessions_per_principal_max: 2,
        ..BrokerConfig::default()
    });
    let mut held = Vec::new();
    for i in 0..2 {
        let mut c = RawClient::open(&broker, true);
        assert_eq!(
            connect_as(&mut c, "svc:a", &format!("live{i}"), true, 0).await,
            ConnectReasonCode::Success
        );
        held.push(c);
    }
    let mut c = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut c, "svc:a", "live2", true, 0).await,
        ConnectReasonCode::QuotaExceeded
    );
    // Taking over one of its own is not a new session; another token has its own budget.
    let mut again = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut again, "svc:a", "live0", true, 0).await,
        ConnectReasonCode::Success
    );
    let mut b = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut b, "svc:b", "live2", true, 0).await,
        ConnectReasonCode::Success
    );
    assert_eq!(broker.stats().refused(Refusal::SessionQuota), 1);
}

#[tokio::test]
async fn a_zero_packet_id_closes_the_connection_without_a_panic() {
    use tokio::io::AsyncWriteExt;
    let broker = broker_with_principals(BrokerConfig::default());
    for v5 in [false, true] {
        let mut c = RawClient::open(&broker, v5);
        c.connect_with("zero", true, 60, None, 0).await;
        // The fuzzer's input: twice PUBLISH QoS 2 "a/b" with packet id 0 (v5: no properties).
        let publish: &[u8] = if v5 {
            &[
                0x34, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x00, 0x00, b'x',
            ]
        } else {
            &[0x34, 0x08, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x00, b'x']
        };
        c.io.write_all(&[publish, publish].concat())
            .await
            .expect("write");
        let mut last = None;
        while let Some(p) = c.recv().await {
            last = Some(p);
        }
        if v5 {
            match last {
                Some(GenericPacket::V5_0Disconnect(d)) => {
                    assert_eq!(d.reason_code(), Some(DisconnectReasonCode::MalformedPacket))
                }
                other => panic!("expected DISCONNECT 0x81, got {other:?}"),
            }
        }
    }
    let s = broker.stats();
    assert_eq!(s.panics, 0);
    assert_eq!(s.refused(Refusal::MalformedPacket), 2);
}

#[tokio::test(start_paused = true)]
async fn shutdown_does_not_wait_on_a_peer_that_stopped_reading() {
    let broker = broker_with_principals(BrokerConfig::default());
    let _stuck = stuck_reader(&broker, "stuck").await;
    let start = Instant::now();
    broker.shutdown().await;
    assert_eq!(broker.stats().connections, 0);
    // Bounded by close_flush_timeout_ms (500 ms), not by the write stall timeout (30 s).
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "shutdown took {:?} of virtual time",
        start.elapsed()
    );
}

#[tokio::test]
async fn publish_to_device_says_whether_it_queued_and_what_it_dropped() {
    let broker = broker_with_principals(BrokerConfig {
        session_queue_len_max: 3,
        ..BrokerConfig::default()
    });
    let mut d = RawClient::open(&broker, true);
    connect_as(&mut d, "dev:d1", "d1", true, 0).await;
    d.subscribe("devices/d1/#", 1).await;
    // Nothing below awaits, so the connection task moves nothing out of the queue meanwhile:
    // three QoS 0 messages fill it.
    for _ in 0..3 {
        broker.publish(Message::new("devices/d1/x", "q0", 0, false));
    }
    let command = || Message::new("devices/d1/commands/c", "{}", 1, false);
    for _ in 0..3 {
        assert_eq!(
            broker.publish_to_device("d1", command()),
            Enqueue::EnqueuedDroppedOldest
        );
    }
    assert_eq!(broker.publish_to_device("d1", command()), Enqueue::Refused);
    assert_eq!(
        broker.publish_to_device("nobody", command()),
        Enqueue::Refused
    );
}

#[tokio::test]
async fn a_service_principals_sessions_are_found_by_its_key_like_a_devices() {
    let broker = broker_with_principals(BrokerConfig::default());
    let svc = PrincipalKey::of(&Principal::Service {
        id: "s1".into(),
        name: "renamed".into(),
    });
    let mut a = RawClient::open(&broker, true);
    connect_as(&mut a, "svc:s1", "s1.a", true, 0).await;
    a.subscribe("jobs/#", 1).await;
    let mut other = RawClient::open(&broker, true);
    connect_as(&mut other, "svc:s2", "s2.a", true, 0).await;
    other.subscribe("jobs/#", 1).await;
    assert!(broker.is_subscribed(&svc, "jobs/1"));
    assert!(!broker.is_subscribed(&svc, "other/1"));
    let job = Message::new("jobs/1", "{}", 1, false);
    assert!(broker.publish_to(&svc, job).is_enqueued());
    assert_eq!(a.next_publish().await.0, "jobs/1");
    broker.kick(&svc, KickReason::NotAuthorized);
    match a.recv().await {
        Some(GenericPacket::V5_0Disconnect(d)) => {
            assert_eq!(d.reason_code(), Some(DisconnectReasonCode::NotAuthorized))
        }
        other => panic!("expected DISCONNECT 0x87, got {other:?}"),
    }
    assert!(a.recv().await.is_none(), "closed");
    assert!(other.ping().await.is_some(), "another principal untouched");
    // A device key never names a service's sessions, even with the same id.
    assert!(!broker.is_subscribed(&PrincipalKey::device("s2"), "jobs/1"));
}
