//! Durable state (`persist.rs`) against an in-memory `Persistence` that can fail, hold its
//! writes, and be "restarted" from what it holds (as after kill -9).

mod support;

use mooring_broker::test_support::raw3::{packet, string, Pkt, Raw3};
use mooring_broker::{
    Authenticated, Broker, BrokerConfig, ConnectRefusal, ConnectRequest, Hooks, Message,
    Persistence, Principal, PublishVerdict, Restored,
};
use std::time::Duration;
use support::mem_persist::MemPersist;
use support::*;

fn cfg() -> BrokerConfig {
    BrokerConfig {
        session_expiry_secs_max: 3600,
        persistent_sessions_per_principal_max: 1000,
        ..BrokerConfig::default()
    }
}

/// A broker on `p`, restored from `state` (a restart).
fn start(p: &MemPersist, state: Restored) -> (Broker, mooring_broker::RestoreStats) {
    start_with(p, state, std::sync::Arc::new(TestHooks::default()))
}

fn start_with(
    p: &MemPersist,
    state: Restored,
    hooks: std::sync::Arc<dyn Hooks>,
) -> (Broker, mooring_broker::RestoreStats) {
    let broker = Broker::with_persistence(cfg(), hooks, std::sync::Arc::new(p.clone()));
    let stats = broker.restore(state);
    (broker, stats)
}

/// [`TestHooks`], except that filters under `denied` may not be subscribed (a policy that
/// changed while the server was down).
struct PolicyHooks {
    inner: TestHooks,
    denied: &'static str,
}

#[async_trait::async_trait]
impl Hooks for PolicyHooks {
    async fn authenticate(&self, req: ConnectRequest<'_>) -> Result<Authenticated, ConnectRefusal> {
        self.inner.authenticate(req).await
    }
    fn may_publish(&self, who: &Principal, topic: &str) -> bool {
        self.inner.may_publish(who, topic)
    }
    fn may_subscribe(&self, who: &Principal, filter: &str) -> bool {
        !filter.starts_with(self.denied) && self.inner.may_subscribe(who, filter)
    }
    async fn on_publish(&self, who: &Principal, client_id: &str, msg: &Message) -> PublishVerdict {
        self.inner.on_publish(who, client_id, msg).await
    }
    fn on_connected(&self, _: &str, _: &Principal) {}
    fn on_disconnected(&self, _: &str, _: &Principal) {}
}

/// A QoS 2 PUBLISH of `payload` on `topic` under `pid` (v3.1.1).
fn qos2_publish(topic: &str, pid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic, &mut body);
    body.extend_from_slice(&pid.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x34, &body)
}

#[tokio::test]
async fn a_restored_session_keeps_its_subscriptions_and_deadline_over_a_second_restart() {
    let p = MemPersist::new(1_000_000);
    let (broker, _) = start(&p, Restored::default());
    let (mut c, present) = Raw3::open(&broker, "keeper", false).await;
    assert!(!present);
    c.subscribe("keep/#", 1).await;
    c.disconnect().await;
    wait_for("keeper offline", || {
        broker.session_info("keeper").is_some_and(|i| !i.connected)
    })
    .await;
    // Offline at t = 1000 s with expiry 3600 s: gone at 4600 s, whatever restarts happen.
    drop(broker);

    p.set_now(2_000_000);
    let (broker, stats) = start(&p, p.snapshot());
    assert_eq!(stats.sessions, 1);
    assert_eq!(
        broker.session_info("keeper").map(|i| i.subscriptions),
        Some(1)
    );
    drop(broker);

    // A second restart, before the deadline: the subscription is still there.
    p.set_now(3_000_000);
    let (broker, stats) = start(&p, p.snapshot());
    assert_eq!(stats.sessions, 1);
    assert_eq!(
        broker.session_info("keeper").map(|i| i.subscriptions),
        Some(1),
        "the value stored at the first restore lost the subscriptions"
    );
    drop(broker);

    // After the original deadline: expired, although two restarts happened meanwhile.
    p.set_now(4_700_000);
    let (broker, stats) = start(&p, p.snapshot());
    assert_eq!(
        (stats.sessions, stats.sessions_expired),
        (0, 1),
        "a restart must not move the deadline of an offline session"
    );
    assert!(broker.session_info("keeper").is_none());
}

#[tokio::test]
async fn a_qos2_publish_never_acknowledged_because_the_store_failed_is_routed_when_resent() {
    let p = MemPersist::new(1_000_000);
    let (broker, _) = start(&p, Restored::default());
    // A persistent subscriber, offline: what is routed to it lives only in the store.
    let (mut watcher, _) = Raw3::open(&broker, "watcher", false).await;
    watcher.subscribe("in/#", 2).await;
    watcher.disconnect().await;
    wait_for("watcher offline", || {
        broker.session_info("watcher").is_some_and(|i| !i.connected)
    })
    .await;
    let (mut publisher, _) = Raw3::open(&broker, "source", false).await;
    let publish = qos2_publish("in/x", 7, b"once");
    p.set_fail(true);
    publisher.send(&publish).await;
    // v3.1.1 cannot say "not stored": the connection closes without PUBREC.
    assert_eq!(publisher.next().await, None);
    p.set_fail(false);
    wait_for("publisher offline", || {
        broker.session_info("source").is_some_and(|i| !i.connected)
    })
    .await;

    // The client resends it (DUP, same id) after reconnecting: this time it must be stored.
    let (mut publisher, present) = Raw3::open(&broker, "source", false).await;
    assert!(present);
    let mut dup = publish.clone();
    dup[0] |= 0x08;
    publisher.send(&dup).await;
    assert_eq!(publisher.next().await, Some(Pkt::Other(5)), "PUBREC");
    publisher.send(&packet(0x62, &7u16.to_be_bytes())).await;
    assert_eq!(publisher.next().await, Some(Pkt::Other(7)), "PUBCOMP");
    drop(publisher);

    // kill -9: only what the store holds counts.
    let state = p.snapshot();
    drop(broker);
    let (broker, _) = start(&p, state);
    let (mut watcher, present) = Raw3::open(&broker, "watcher", false).await;
    assert!(present);
    match watcher.next().await {
        Some(Pkt::Publish { payload, .. }) => assert_eq!(
            payload, b"once",
            "the acknowledged resend must have been routed and stored"
        ),
        other => panic!("expected the message: {other:?}"),
    }
}

#[tokio::test]
async fn pubcomp_waits_until_the_released_id_is_durable() {
    let p = MemPersist::new(1_000_000);
    let (broker, _) = start(&p, Restored::default());
    let (mut publisher, _) = Raw3::open(&broker, "source", false).await;
    publisher.send(&qos2_publish("in/x", 9, b"m")).await;
    assert_eq!(publisher.next().await, Some(Pkt::Other(5)), "PUBREC");
    p.set_hold(true);
    publisher.send(&packet(0x62, &9u16.to_be_bytes())).await;
    // Until the store has forgotten id 9, a PUBCOMP would let the client reuse it for a new
    // message, which a restart (the id still stored) would then take for a resend and drop.
    assert_eq!(
        publisher.next_within(Duration::from_millis(300)).await,
        None,
        "PUBCOMP before the session without id 9 is durable"
    );
    // kill -9 now: the id is still stored, and the client (no PUBCOMP) sends PUBREL again.
    let state = p.snapshot();
    p.set_hold(false);
    assert_eq!(publisher.next().await, Some(Pkt::Other(7)), "PUBCOMP");
    drop(publisher);
    drop(broker);
    let (broker, _) = start(&MemPersist::new(1_000_000), state);
    let (mut publisher, present) = Raw3::open(&broker, "source", false).await;
    assert!(present);
    publisher.send(&packet(0x62, &9u16.to_be_bytes())).await;
    assert_eq!(publisher.next().await, Some(Pkt::Other(7)), "PUBCOMP");
}

#[tokio::test]
async fn pubrel_waits_until_the_received_state_is_durable() {
    let p = MemPersist::new(1_000_000);
    let (broker, _) = start(&p, Restored::default());
    let (mut sink, _) = Raw3::open(&broker, "sink", false).await;
    sink.subscribe("q2/#", 2).await;
    let (mut publisher, _) = Raw3::open(&broker, "source", false).await;
    publisher.send(&qos2_publish("q2/a", 3, b"a")).await;
    assert_eq!(publisher.next().await, Some(Pkt::Other(5)), "PUBREC");
    let pid = match sink.next().await {
        Some(Pkt::Publish { pid, qos: 2, .. }) => pid,
        other => panic!("expected the message: {other:?}"),
    };
    p.set_hold(true);
    // PUBREC
    sink.send(&packet(0x50, &pid.to_be_bytes())).await;
    // The PUBREL tells the client the flow is done with the message; if the server died before
    // storing that, it would send the message again after the restart (a second delivery).
    assert_eq!(
        sink.next_within(Duration::from_millis(300)).await,
        None,
        "PUBREL before the received state is durable"
    );
    p.set_hold(false);
    assert_eq!(sink.next().await, Some(Pkt::PubRel { pid }));
}

#[tokio::test]
async fn a_subscribe_flood_on_a_persistent_session_does_not_queue_a_session_value_per_packet() {
    let p = MemPersist::new(1_000_000);
    let (broker, _) = start(&p, Restored::default());
    let (mut c, _) = Raw3::open(&broker, "flood", false).await;
    p.set_hold(true);
    // 2000 SUBSCRIBE packets of the same filter, sent without waiting for any SUBACK.
    let mut burst = Vec::new();
    for i in 0..2000u16 {
        let mut body = (i + 1).to_be_bytes().to_vec();
        string("flood/topic/with/some/levels", &mut body);
        body.push(1);
        burst.extend_from_slice(&packet(0x82, &body));
    }
    c.send(&burst).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = p.held_ops();
    assert!(
        held <= 4,
        "{held} ops wait for the store: each SUBSCRIBE queued a copy of the session"
    );
    p.set_hold(false);
    let mut subacks = 0;
    while subacks < 2000 {
        match c.next().await {
            Some(Pkt::SubAck) => subacks += 1,
            other => panic!("expected SUBACK: {other:?}"),
        }
    }
    assert_eq!(
        broker.session_info("flood").map(|i| i.subscriptions),
        Some(1)
    );
    let _ = p.submit(Vec::new()).await;
    let (broker, _) = start(&p, p.snapshot());
    assert_eq!(
        broker.session_info("flood").map(|i| i.subscriptions),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_acknowledged_while_it_is_still_being_routed_is_not_left_stored() {
    let p = MemPersist::new(1_000_000);
    let (broker, _) = start(&p, Restored::default());
    // Many persistent subscribers acknowledging at once: the first ones acknowledge a message
    // while it is still being queued for the others.
    const SUBS: usize = 400;
    const MSGS: usize = 10;
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..SUBS {
        let (mut c, _) = Raw3::open(&broker, &format!("fan{i}"), false).await;
        c.subscribe("fan/#", 1).await;
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(Pkt::Publish { pid, .. }) = c.next_within(Duration::from_secs(30)).await
            {
                c.send(&packet(0x40, &pid.to_be_bytes())).await;
                received.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
    }
    let (mut publisher, _) = Raw3::open(&broker, "fan-source", true).await;
    for m in 0..MSGS as u16 {
        let mut body = Vec::new();
        string("fan/x", &mut body);
        body.extend_from_slice(&(m + 1).to_be_bytes());
        body.extend_from_slice(&[b'm'; 16 * 1024]);
        publisher.send(&packet(0x32, &body)).await;
        assert_eq!(publisher.next().await, Some(Pkt::Other(4)), "PUBACK");
    }
    wait_for("every message acknowledged", || {
        received.load(std::sync::atomic::Ordering::SeqCst) == SUBS * MSGS
    })
    .await;
    wait_for("every delete applied", || {
        p.messages() == 0 || p.late_puts() > 0
    })
    .await;
    assert_eq!(
        (p.late_puts(), p.messages()),
        (0, 0),
        "a put applied after the delete of its message stays stored"
    );
}

#[tokio::test]
async fn a_restored_session_loses_the_subscriptions_the_policy_no_longer_allows() {
    let p = MemPersist::new(1_000_000);
    let (broker, _) = start(&p, Restored::default());
    let (mut c, _) = Raw3::open(&broker, "watcher", false).await;
    c.subscribe("open/#", 1).await;
    c.subscribe("closed/#", 1).await;
    c.disconnect().await;
    wait_for("watcher offline", || {
        broker.session_info("watcher").is_some_and(|i| !i.connected)
    })
    .await;
    drop(broker);
    // Restarted with a policy that no longer allows closed/#.
    let hooks = std::sync::Arc::new(PolicyHooks {
        inner: TestHooks::default(),
        denied: "closed/",
    });
    let (broker, _) = start_with(&p, p.snapshot(), hooks);
    assert_eq!(
        broker.session_info("watcher").map(|i| i.subscriptions),
        Some(1)
    );
    broker.publish(Message::new("closed/x", "not for it", 1, false));
    broker.publish(Message::new("open/x", "for it", 1, false));
    assert_eq!(broker.session_info("watcher").map(|i| i.queued), Some(1));
}

#[tokio::test]
async fn expired_retained_messages_given_back_for_room_leave_the_store_too() {
    use mqtt_protocol_core::mqtt;
    use mqtt_protocol_core::mqtt::packet::{v5_0, GenericPacket, Qos};
    let p = MemPersist::new(1_000_000);
    let hooks = std::sync::Arc::new(TestHooks::default());
    let config = BrokerConfig {
        retained_per_principal_max: 2,
        ..cfg()
    };
    let broker = Broker::with_persistence(config, hooks, std::sync::Arc::new(p.clone()));
    broker.restore(Restored::default());
    let mut c = RawClient::open(&broker, true);
    c.connect("retainer").await;
    for (topic, expiry) in [("r/1", Some(1)), ("r/2", Some(1)), ("r/3", None)] {
        if topic == "r/3" {
            // r/1 and r/2 have expired: storing r/3 gives their room back.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let pid = c.mqtt.acquire_packet_id().expect("pid");
        let mut b = v5_0::Publish::builder()
            .topic_name(topic)
            .expect("topic")
            .qos(Qos::AtLeastOnce)
            .retain(true)
            .payload("x")
            .packet_id(pid);
        if let Some(secs) = expiry {
            b = b.props(vec![mqtt::packet::MessageExpiryInterval::new(secs)
                .expect("expiry")
                .into()]);
        }
        c.send(b.build().expect("publish").into()).await;
        match c.recv().await {
            Some(GenericPacket::V5_0Puback(a)) => assert_eq!(a.packet_id(), pid),
            other => panic!("PUBACK: {other:?}"),
        }
    }
    let stored: Vec<String> = p.snapshot().retained.into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        stored,
        vec!["r/3".to_string()],
        "expired rows left in the store"
    );
}

#[tokio::test]
async fn a_stored_deadline_too_far_away_does_not_panic_the_restore() {
    let p = MemPersist::new(1_000_000);
    // A retained message (owner d1, topic t, payload p) whose stored expiry is u64::MAX.
    let mut value = Vec::new();
    for pair in "0101000000000264310000000174000000017001010000000000"
        .as_bytes()
        .chunks(2)
    {
        let hex = std::str::from_utf8(pair).expect("hex");
        value.push(u8::from_str_radix(hex, 16).expect("hex"));
    }
    value.extend_from_slice(&[0, 0, 0, 0]); // no user properties
    value.extend_from_slice(&u64::MAX.to_be_bytes());
    let (broker, stats) = start(
        &p,
        Restored {
            retained: vec![("t".into(), value)],
            sessions: Vec::new(),
        },
    );
    assert_eq!(stats.retained, 1);
    assert_eq!(broker.stats().retained, 1);
}

#[tokio::test]
async fn a_qos0_retained_flood_waits_for_the_store_like_acknowledged_publishes() {
    let p = MemPersist::new(1_000_000);
    let (broker, _) = start(&p, Restored::default());
    let (mut c, _) = Raw3::open(&broker, "retainer", true).await;
    p.set_hold(true);
    // 500 QoS 0 retained messages on one topic (each replaces the last), 1 KiB each.
    let mut burst = Vec::new();
    for _ in 0..500 {
        let mut body = Vec::new();
        string("r/t", &mut body);
        body.extend_from_slice(&[b'x'; 1024]);
        burst.extend_from_slice(&packet(0x31, &body));
    }
    c.send(&burst).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = p.held_ops();
    let bound = usize::from(cfg().inflight_max) + 16; // and what one read holds
    assert!(
        held <= bound,
        "{held} retained values wait for the store (more than {bound})"
    );
    p.set_hold(false);
    // All of them are processed once the store moves.
    c.send(&[0xC0, 0]).await; // PINGREQ
    assert_eq!(c.next().await, Some(Pkt::Other(13)), "PINGRESP");
    assert_eq!(broker.stats().retained, 1);
}

#[tokio::test]
async fn a_session_handed_over_to_another_broker_resumes_there_with_its_queued_messages() {
    // Two brokers on one store, as two nodes of a cluster.
    let p = MemPersist::new(1_000_000);
    let (a, _) = start(&p, Restored::default());
    let (b, _) = start(&p, Restored::default());
    let (mut c, _) = Raw3::open(&a, "mover", false).await;
    c.subscribe("jobs/#", 2).await;
    c.disconnect().await;
    wait_for("mover offline on a", || {
        a.session_info("mover").is_some_and(|i| !i.connected)
    })
    .await;
    a.publish(Message::new("jobs/1", "queued while away", 2, false));
    wait_for("queued message stored", || p.messages_of("x:mover") == 1).await;

    // The client shows up at b: a hands it over (forgetting it without touching the store),
    // b takes it from the store before serving the client.
    assert_eq!(
        a.hand_over(&mooring_broker::PrincipalKey::of(&Principal::Dev)),
        1
    );
    assert!(a.session_info("mover").is_none());
    let stored = p
        .snapshot()
        .sessions
        .into_iter()
        .find(|s| s.key == "x:mover")
        .expect("still stored after the hand-over");
    assert!(b.adopt(stored.clone()));
    assert!(!b.adopt(stored), "a session b holds is not replaced");
    let (mut c, present) = Raw3::open(&b, "mover", false).await;
    assert!(present, "the session resumes on b");
    c.expect_qos2(b"queued while away").await;
    assert_eq!(
        b.session_info("mover").map(|i| i.subscriptions),
        Some(1),
        "with its subscription"
    );
}
