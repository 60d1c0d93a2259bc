//! Reproductions from the security review of the issue 8 broker changes: each test is an attack
//! that worked against the first version of the change, and states the property it expects.

mod support;

use mooring_broker::{
    Authenticated, Broker, BrokerConfig, ConnectRefusal, ConnectRequest, Hooks, Message,
    MessageProps, Principal, PublishVerdict, Refusal,
};
use mqtt_protocol_core::mqtt;
use mqtt_protocol_core::mqtt::packet::{v5_0, GenericPacket};
use mqtt_protocol_core::mqtt::result_code::{ConnectReasonCode, PubackReasonCode};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use support::principals::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Reads (and discards) the next PUBLISH that is not `skip`; returns its (topic, payload).
async fn first_publish(c: &mut RawClient) -> (String, String) {
    let (t, p, ..) = c.next_publish().await;
    (t, p)
}

// ---------------------------------------------------------------------------------------------
// 1. Revocation removes the subscription but not what it already queued.

#[tokio::test]
async fn messages_queued_under_a_revoked_subscription_are_not_delivered_after_a_tag_change() {
    let broker = broker_with_principals(BrokerConfig::default());
    let mut d = RawClient::open(&broker, true);
    connect_as(&mut d, "dev:d1@berlin", "d1", true, 600).await;
    d.subscribe("sites/berlin/#", 1).await;
    d.subscribe("devices/d1/x", 1).await;
    d.disconnect().await;
    wait_until(&broker, |b| {
        b.session_info("d1").is_some_and(|i| !i.connected)
    })
    .await;
    // Queued for the offline session while it may still read Berlin.
    broker.publish(Message::new("sites/berlin/door", "berlin-secret", 1, false));
    assert_eq!(broker.session_info("d1").expect("session").queued, 1);
    // The device moves to Paris: Berlin is no longer allowed.
    let mut tags = BTreeMap::new();
    tags.insert("site".to_string(), "paris".to_string());
    assert_eq!(
        broker.update_principal(Principal::Device {
            id: mooring_proto::DeviceId::parse("d1").expect("test device id"),
            tags
        }),
        1
    );
    let mut again = RawClient::open(&broker, true);
    connect_as(&mut again, "dev:d1@paris", "d1", false, 600).await;
    broker.publish(Message::new("devices/d1/x", "marker", 1, false));
    let (topic, payload) = first_publish(&mut again).await;
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("devices/d1/x", "marker"),
        "a message of a revoked subscription was delivered after revocation"
    );
}

#[tokio::test]
async fn messages_queued_under_a_revoked_subscription_are_not_delivered_after_a_policy_reload() {
    // The policy is a switch: while `allow` is set, devices may read `broadcast/#`.
    struct Switch(std::sync::atomic::AtomicBool);
    #[async_trait::async_trait]
    impl Hooks for Switch {
        async fn authenticate(
            &self,
            req: ConnectRequest<'_>,
        ) -> Result<Authenticated, ConnectRefusal> {
            Ok(Authenticated {
                client_id: req.client_id.to_string(),
                principal: Principal::Device {
                    id: mooring_proto::DeviceId::parse(req.client_id).expect("test device id"),
                    tags: BTreeMap::new(),
                },
            })
        }
        fn may_publish(&self, _: &Principal, _: &str) -> bool {
            true
        }
        fn may_subscribe(&self, _: &Principal, filter: &str) -> bool {
            !filter.starts_with("broadcast/") || self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
        async fn on_publish(&self, _: &Principal, _: &str, _: &Message) -> PublishVerdict {
            PublishVerdict::Accept
        }
        fn on_connected(&self, _: &str, _: &Principal) {}
        fn on_disconnected(&self, _: &str, _: &Principal) {}
    }
    let hooks = Arc::new(Switch(std::sync::atomic::AtomicBool::new(true)));
    let broker = Broker::new(BrokerConfig::default(), hooks.clone());
    let mut d = RawClient::open(&broker, true);
    connect_as(&mut d, "", "d1", true, 600).await;
    d.subscribe("broadcast/#", 1).await;
    d.subscribe("devices/d1/x", 1).await;
    d.disconnect().await;
    wait_until(&broker, |b| {
        b.session_info("d1").is_some_and(|i| !i.connected)
    })
    .await;
    broker.publish(Message::new("broadcast/all", "old-policy", 1, false));
    hooks.0.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(broker.reauthorize_all(), 1);
    let mut again = RawClient::open(&broker, true);
    connect_as(&mut again, "", "d1", false, 600).await;
    broker.publish(Message::new("devices/d1/x", "marker", 1, false));
    let (topic, _) = first_publish(&mut again).await;
    assert_eq!(
        topic, "devices/d1/x",
        "a message of a revoked subscription was delivered after the policy reload"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A device CONNECT waiting for a takeover survives remove_device and gets a fresh session.

/// Opens a device connection `id` subscribed to `devices/<id>/#` and fills its pipe (the client
/// never reads), so the broker's write is blocked and a close takes close_flush_timeout_ms.
async fn stuck_device(broker: &Broker, id: &str) -> RawClient {
    let mut c = RawClient::open(broker, true);
    connect_as(&mut c, &format!("dev:{id}"), id, true, 0).await;
    c.subscribe(&format!("devices/{id}/#"), 0).await;
    let payload = "p".repeat(10 * 1024);
    for _ in 0..20 {
        broker.publish(Message::new(
            format!("devices/{id}/x"),
            payload.clone(),
            0,
            false,
        ));
    }
    c
}

#[tokio::test(start_paused = true)]
async fn a_device_deleted_while_its_takeover_waits_does_not_get_a_new_session() {
    let (broker, hooks) = broker_with_registry(BrokerConfig::default());
    let _a = stuck_device(&broker, "d1").await;
    // The same certificate connects again; the broker sends TakenOver and waits for the old
    // connection, whose close flush is blocked.
    let mut b = RawClient::open(&broker, true);
    b.send(connect_packet("dev:d1", "d1", true, 0, 0)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The operator deletes the device now (the server deletes it from the store first, so a
    // later CONNECT would be refused by authentication).
    hooks
        .registry
        .lock()
        .expect("registry")
        .insert("d1".into(), None);
    broker.remove_device("d1", Some("devices/d1/"));
    let code = match b.recv().await {
        Some(GenericPacket::V5_0Connack(a)) => Some(a.reason_code()),
        _ => None,
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let info = broker.session_info("d1");
    assert!(
        code != Some(ConnectReasonCode::Success) && info.is_none(),
        "deleted device attached after remove_device: CONNACK {code:?}, session {info:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. The flush between CONNACK and the main loop ignores control messages.

/// d1 leaves 4 × 60 KiB of QoS 1 queued in its persistent session, then resumes it and never
/// reads: the CONNACK and the backlog sit in the write buffer (the pipe holds 64 KiB).
async fn resume_without_reading(broker: &Broker) -> RawClient {
    let mut d = RawClient::open(broker, true);
    connect_as(&mut d, "dev:d1", "d1", true, 600).await;
    d.subscribe("devices/d1/#", 1).await;
    d.disconnect().await;
    wait_until(broker, |b| {
        b.session_info("d1").is_some_and(|i| !i.connected)
    })
    .await;
    let payload = "q".repeat(60 * 1024);
    for _ in 0..4 {
        broker.publish(Message::new("devices/d1/x", payload.clone(), 1, false));
    }
    let mut stuck = RawClient::open(broker, true);
    stuck
        .send(connect_packet("dev:d1", "d1", false, 600, 0))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    stuck
}

#[tokio::test(start_paused = true)]
async fn takeover_is_not_held_by_a_resumed_connection_that_does_not_read_its_backlog() {
    let broker = broker_with_principals(BrokerConfig::default());
    let _stuck = resume_without_reading(&broker).await;
    assert!(broker.session_info("d1").is_some_and(|i| i.connected));
    let start = Instant::now();
    let mut again = RawClient::open(&broker, true);
    assert_eq!(
        connect_as(&mut again, "dev:d1", "d1", false, 600).await,
        ConnectReasonCode::Success
    );
    let took = start.elapsed();
    let conns = broker.stats().connections;
    assert!(
        took < Duration::from_secs(1) && conns == 1,
        "takeover took {took:?} of virtual time; {conns} connections after it"
    );
}

#[tokio::test(start_paused = true)]
async fn remove_device_closes_a_resumed_connection_that_does_not_read_its_backlog_at_once() {
    let broker = broker_with_principals(BrokerConfig::default());
    let _stuck = resume_without_reading(&broker).await;
    assert_eq!(broker.stats().connections, 1);
    let start = Instant::now();
    broker.remove_device("d1", None);
    wait_until(&broker, |b| b.stats().connections == 0).await;
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the removed device's connection stayed {took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Read pause starves keep-alive: a live, slowly-reading client is closed as "keepalive".

#[tokio::test(start_paused = true)]
async fn a_slow_but_live_reader_is_not_closed_for_keepalive_while_reading_is_paused() {
    let broker = broker_with_principals(BrokerConfig::default());
    let mut c = RawClient::open(&broker, true);
    c.send(connect_packet("", "slow", true, 0, 10)).await;
    match c.recv().await {
        Some(GenericPacket::V5_0Connack(a)) => {
            assert_eq!(a.reason_code(), ConnectReasonCode::Success)
        }
        other => panic!("CONNACK: {other:?}"),
    }
    c.subscribe("t/#", 0).await;
    // One 250 KiB message: the write buffer holds more than 2 × write_buffer_bytes_max, so the
    // broker stops reading until the client has drained it.
    broker.publish(Message::new("t/big", "b".repeat(250 * 1024), 0, false));
    // The client reads 4 KiB a second (a slow link) and sends PINGREQ every 5 s, as a
    // keepalive-10 client does.
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    let mut closed_at = None;
    for sec in 0..40u64 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if sec % 5 == 0 {
            let _ = c.io.write_all(&[0xC0, 0x00]).await;
        }
        match tokio::time::timeout(Duration::from_millis(1), c.io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_at = Some(start.elapsed());
                break;
            }
            _ => {}
        }
        if broker.stats().connections == 0 {
            closed_at = Some(start.elapsed());
            break;
        }
    }
    assert!(
        closed_at.is_none(),
        "live client closed after {closed_at:?} (keepalive timeouts: {})",
        broker.stats().refused(Refusal::KeepaliveTimeout)
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Byte quotas count topic + payload only; v5 properties ride along for free.

fn big_props(bytes: usize) -> Vec<mqtt::packet::Property> {
    vec![mqtt::packet::UserProperty::new("k", "u".repeat(bytes))
        .expect("user property")
        .into()]
}

#[tokio::test]
async fn retained_bytes_quota_counts_what_is_stored_including_v5_properties() {
    let broker = broker_with_principals(BrokerConfig {
        retained_bytes_per_principal_max: 4096,
        ..BrokerConfig::default()
    });
    let mut d = RawClient::open(&broker, true);
    connect_as(&mut d, "dev:d1", "d1", true, 0).await;
    let mut accepted = 0;
    for i in 0..20u16 {
        let pid = d.mqtt.acquire_packet_id().expect("pid");
        let p = v5_0::Publish::builder()
            .topic_name(format!("devices/d1/r{i}"))
            .expect("topic")
            .qos(qos(1))
            .retain(true)
            .packet_id(pid)
            .payload("x")
            .props(big_props(60 * 1024))
            .build()
            .expect("publish");
        d.send(p.into()).await;
        match d.recv().await {
            Some(GenericPacket::V5_0Puback(a)) if a.reason_code().is_none() => accepted += 1,
            Some(GenericPacket::V5_0Puback(a)) => {
                assert_eq!(a.reason_code(), Some(PubackReasonCode::QuotaExceeded))
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    assert_eq!(
        accepted,
        0,
        "{accepted} retained messages of 60 KiB each stored under a 4 KiB quota (retained_bytes gauge: {})",
        broker.stats().retained_bytes
    );
}

#[tokio::test]
async fn session_queue_bytes_bound_counts_v5_properties() {
    let broker = broker_with_principals(BrokerConfig {
        session_queue_bytes_max: 10 * 1024,
        ..BrokerConfig::default()
    });
    let mut s = RawClient::open(&broker, true);
    connect_as(&mut s, "svc:a", "offline", true, 600).await;
    s.subscribe("t/#", 1).await;
    s.disconnect().await;
    wait_until(&broker, |b| {
        b.session_info("offline").is_some_and(|i| !i.connected)
    })
    .await;
    for _ in 0..20 {
        let mut m = Message::new("t/1", "x", 1, false);
        m.props = MessageProps {
            user_properties: vec![("k".into(), "u".repeat(60 * 1024))],
            ..MessageProps::default()
        };
        broker.publish(m);
    }
    let queued = broker.session_info("offline").expect("session").queued;
    assert!(
        queued <= 1,
        "{queued} messages of 60 KiB queued under a 10 KiB session_queue_bytes_max"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Expired retained messages keep counting against the owner's quota.

#[tokio::test(start_paused = true)]
async fn expired_retained_messages_do_not_count_against_the_quota() {
    let broker = broker_with_principals(BrokerConfig {
        retained_per_principal_max: 3,
        ..BrokerConfig::default()
    });
    let mut d = RawClient::open(&broker, true);
    connect_as(&mut d, "dev:d1", "d1", true, 0).await;
    let publish = |topic: String, expiry: Option<u32>| {
        let mut b = v5_0::Publish::builder()
            .topic_name(topic)
            .expect("topic")
            .qos(qos(1))
            .retain(true)
            .payload("x");
        if let Some(e) = expiry {
            b = b.props(vec![mqtt::packet::MessageExpiryInterval::new(e)
                .expect("mei")
                .into()]);
        }
        b
    };
    for i in 0..3 {
        let pid = d.mqtt.acquire_packet_id().expect("pid");
        let p = publish(format!("devices/d1/t{i}"), Some(1))
            .packet_id(pid)
            .build()
            .expect("p");
        d.send(p.into()).await;
        d.recv().await.expect("puback");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = d.mqtt.acquire_packet_id().expect("pid");
    let p = publish("devices/d1/new".into(), None)
        .packet_id(pid)
        .build()
        .expect("p");
    d.send(p.into()).await;
    match d.recv().await {
        Some(GenericPacket::V5_0Puback(a)) => assert_eq!(
            a.reason_code(),
            None,
            "refused although the 3 retained messages expired long ago"
        ),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 7. A CONNECT authenticated with the old tags attaches after update_principal with them.

#[tokio::test(start_paused = true)]
async fn a_connect_authenticated_before_a_tag_change_does_not_attach_with_the_old_tags() {
    let (broker, hooks) = broker_with_registry(BrokerConfig::default());
    // d1 (Berlin) is connected and its write is blocked, so a takeover waits for its close.
    let mut a = RawClient::open(&broker, true);
    connect_as(&mut a, "dev:d1@berlin", "d1", true, 0).await;
    a.subscribe("devices/d1/#", 0).await;
    let payload = "p".repeat(10 * 1024);
    for _ in 0..20 {
        broker.publish(Message::new("devices/d1/x", payload.clone(), 0, false));
    }
    // The device reconnects; authentication (by the embedder) saw the Berlin tags.
    let mut b = RawClient::open(&broker, true);
    b.send(connect_packet("dev:d1@berlin", "d1", true, 0, 0))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The operator moves it to Paris now (registry first, then the broker, as the server does).
    hooks
        .registry
        .lock()
        .expect("registry")
        .insert("d1".into(), Some("paris".into()));
    let mut tags = BTreeMap::new();
    tags.insert("site".to_string(), "paris".to_string());
    broker.update_principal(Principal::Device {
        id: mooring_proto::DeviceId::parse("d1").expect("test device id"),
        tags,
    });
    match b.recv().await {
        Some(GenericPacket::V5_0Connack(c)) => {
            assert_eq!(c.reason_code(), ConnectReasonCode::Success)
        }
        other => panic!("CONNACK: {other:?}"),
    }
    let granted = match b.subscribe("sites/berlin/#", 1).await {
        GenericPacket::V5_0Suback(s) => s.reason_codes(),
        other => panic!("SUBACK: {other:?}"),
    };
    assert_ne!(
        granted,
        vec![mqtt::result_code::SubackReasonCode::GrantedQos1],
        "Berlin granted after the device was moved to Paris"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Keepalive 0 supervision is reset by any byte, so a trickled partial packet holds the
//    connection open forever.

#[tokio::test(start_paused = true)]
async fn keepalive_zero_supervision_is_not_reset_by_a_trickled_partial_packet() {
    let broker = broker_with_principals(BrokerConfig {
        keepalive_secs_max: 10,
        ..BrokerConfig::default()
    });
    let mut c = RawClient::open(&broker, false);
    c.connect_with("trickle", true, 0, None, 0).await;
    // A PUBLISH header announcing 200 bytes, then one byte every 14 s (cap: 15 s).
    c.io.write_all(&[0x30, 200]).await.expect("header");
    let start = Instant::now();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(14)).await;
        let _ = c.io.write_all(b"a").await;
        if broker.stats().connections == 0 {
            break;
        }
    }
    assert_eq!(
        broker.stats().connections,
        0,
        "a client sending no complete packet for {:?} is still connected",
        start.elapsed()
    );
}
