//! Shared subscriptions (`$share/<group>/<filter>`): spread, redelivery, scope, refusals, bounds.

mod support;

use mooring_broker::{
    Authenticated, Broker, BrokerConfig, ConnectRefusal, ConnectRequest, Hooks, Message, Principal,
    PublishVerdict,
};
use mqtt_protocol_core::mqtt::packet::{GenericPacket, Property, SubOpts};
use mqtt_protocol_core::mqtt::result_code::{
    DisconnectReasonCode, SubackReasonCode, SubackReturnCode, UnsubackReasonCode,
};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use support::principals::{broker_with_principals, connect_as};
use support::*;

/// A v5 client `id` (clean, no session expiry) subscribed to `filter` at QoS 1.
async fn member(broker: &Broker, id: &str, filter: &str) -> RawClient {
    let mut c = RawClient::open(broker, true);
    c.connect(id).await;
    assert_eq!(
        suback_code(&c.subscribe(filter, 1).await),
        1,
        "{id} {filter}"
    );
    c
}

/// The single SUBACK code (v5 reason code or v3.1.1 return code) as a byte.
fn suback_code(p: &GenericPacket<u16>) -> u8 {
    match p {
        GenericPacket::V5_0Suback(a) => {
            let codes = a.reason_codes();
            assert_eq!(codes.len(), 1);
            codes[0] as u8
        }
        GenericPacket::V3_1_1Suback(a) => {
            let codes = a.return_codes();
            assert_eq!(codes.len(), 1);
            codes[0] as u8
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// Payloads of the next `n` PUBLISH packets.
async fn payloads(c: &mut RawClient, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(c.next_publish().await.1);
    }
    out
}

async fn publish_numbered(broker: &Broker, topic: &str, n: usize) {
    let mut p = RawClient::open(broker, true);
    p.connect("publisher").await;
    for i in 0..n {
        p.publish(topic, &i.to_string(), 1, false).await;
    }
    // Every PUBACK back: every message has been routed.
    for _ in 0..n {
        assert!(matches!(p.recv().await, Some(GenericPacket::V5_0Puback(_))));
    }
}

#[tokio::test]
async fn a_group_spreads_messages_round_robin_each_to_exactly_one_member() {
    let (broker, _) = broker();
    let mut members = Vec::new();
    for id in ["w0", "w1", "w2"] {
        members.push(member(&broker, id, "$share/workers/jobs/+").await);
    }
    publish_numbered(&broker, "jobs/a", 9).await;
    let mut all = BTreeSet::new();
    for (i, m) in members.iter_mut().enumerate() {
        let got = payloads(m, 3).await;
        let want: Vec<String> = (0..3).map(|k| (i + 3 * k).to_string()).collect();
        assert_eq!(got, want, "member {i}");
        all.extend(got);
    }
    assert_eq!(all.len(), 9, "each message went to exactly one member");
    assert_eq!(broker.stats().messages_out, 9, "nothing delivered twice");
    assert_eq!(broker.stats().shared_groups, 1);
    assert_eq!(broker.stats().subscriptions, 3);
}

#[tokio::test]
async fn an_ordinary_subscriber_gets_every_message_besides_the_group() {
    let (broker, _) = broker();
    let mut a = member(&broker, "a", "$share/g/t/#").await;
    let mut b = member(&broker, "b", "$share/g/t/#").await;
    let mut plain = member(&broker, "plain", "t/#").await;
    // Also in a second group on the same filter: that group gets every message too.
    let mut solo = member(&broker, "solo", "$share/other/t/+").await;
    publish_numbered(&broker, "t/x", 4).await;
    assert_eq!(payloads(&mut plain, 4).await, ["0", "1", "2", "3"]);
    assert_eq!(payloads(&mut solo, 4).await, ["0", "1", "2", "3"]);
    assert_eq!(payloads(&mut a, 2).await, ["0", "2"]);
    assert_eq!(payloads(&mut b, 2).await, ["1", "3"]);
    assert_eq!(broker.stats().messages_out, 12);
}

#[tokio::test]
async fn unacknowledged_messages_of_a_member_that_disconnects_go_to_another_member() {
    let (broker, _) = broker();
    let mut a = RawClient::open(&broker, true);
    a.connect("a").await;
    a.mqtt.set_auto_pub_response(false);
    assert_eq!(suback_code(&a.subscribe("$share/g/t", 1).await), 1);
    let mut b = member(&broker, "b", "$share/g/t").await;
    publish_numbered(&broker, "t", 4).await;
    // `a` receives its two but never acknowledges them, then its connection drops.
    assert_eq!(payloads(&mut a, 2).await, ["0", "2"]);
    drop(a);
    let got: BTreeSet<String> = payloads(&mut b, 4).await.into_iter().collect();
    assert_eq!(got, ["0", "1", "2", "3"].map(String::from).into());
    assert_eq!(broker.stats().shared_redelivered, 2);
    wait_for("a's session is gone", || broker.session_info("a").is_none()).await;
    assert_eq!(broker.stats().subscriptions, 1, "a left the group");
}

#[tokio::test]
async fn a_persistent_member_hands_unacked_messages_to_an_online_member_and_queues_when_alone() {
    let (broker, _) = broker();
    let mut a = RawClient::open(&broker, true);
    a.connect_with("a", true, 0, None, 600).await;
    a.mqtt.set_auto_pub_response(false);
    a.subscribe("$share/g/t", 1).await;
    let mut b = member(&broker, "b", "$share/g/t").await;
    publish_numbered(&broker, "t", 2).await;
    assert_eq!(payloads(&mut a, 1).await, ["0"]);
    assert_eq!(payloads(&mut b, 1).await, ["1"]);
    a.disconnect().await;
    drop(a);
    // `b` is online: the message `a` never acknowledged moves to it.
    assert_eq!(payloads(&mut b, 1).await, ["0"]);
    assert_eq!(broker.stats().shared_redelivered, 1);
    b.disconnect().await;
    drop(b);
    wait_for("b's session is gone", || broker.session_info("b").is_none()).await;
    // No member online: the persistent member's session queues it.
    broker.publish(Message::new("t", "2", 1, false));
    assert_eq!(broker.session_info("a").map(|i| i.queued), Some(1));
    let mut a = RawClient::open(&broker, true);
    a.connect_with("a", false, 0, None, 600).await;
    let (_, payload, _, _, dup) = a.next_publish().await;
    assert_eq!(
        (payload.as_str(), dup),
        ("2", false),
        "the moved message is not resent to a"
    );
}

#[tokio::test]
async fn a_persistent_member_alone_keeps_its_unacked_messages_for_its_return() {
    let (broker, _) = broker();
    let mut a = RawClient::open(&broker, true);
    a.connect_with("a", true, 0, None, 600).await;
    a.mqtt.set_auto_pub_response(false);
    a.subscribe("$share/g/t", 1).await;
    publish_numbered(&broker, "t", 1).await;
    assert_eq!(payloads(&mut a, 1).await, ["0"]);
    a.disconnect().await;
    drop(a);
    wait_for("a is offline", || {
        broker.session_info("a").is_some_and(|i| !i.connected)
    })
    .await;
    let mut a = RawClient::open(&broker, true);
    a.connect_with("a", false, 0, None, 600).await;
    let (_, payload, _, _, dup) = a.next_publish().await;
    assert_eq!((payload.as_str(), dup), ("0", true));
    assert_eq!(broker.stats().shared_redelivered, 0);
}

#[tokio::test]
async fn unsubscribe_takes_the_full_shared_filter_and_the_last_member_removes_the_group() {
    let (broker, _) = broker();
    let mut a = member(&broker, "a", "$share/g/t").await;
    let mut b = member(&broker, "b", "$share/g/t").await;
    let unsub_code = |p: GenericPacket<u16>| match p {
        GenericPacket::V5_0Unsuback(u) => u.reason_codes(),
        other => panic!("expected UNSUBACK, got {other:?}"),
    };
    assert_eq!(
        unsub_code(a.unsubscribe("t").await),
        [UnsubackReasonCode::NoSubscriptionExisted]
    );
    assert_eq!(
        unsub_code(a.unsubscribe("$share/g/t").await),
        [UnsubackReasonCode::Success]
    );
    publish_numbered(&broker, "t", 2).await;
    assert_eq!(payloads(&mut b, 2).await, ["0", "1"]);
    assert_eq!(broker.stats().shared_groups, 1);
    assert_eq!(
        unsub_code(b.unsubscribe("$share/g/t").await),
        [UnsubackReasonCode::Success]
    );
    let stats = broker.stats();
    assert_eq!((stats.shared_groups, stats.subscriptions), (0, 0));
    // A group whose members' sessions end goes too.
    let c = member(&broker, "c", "$share/h/t").await;
    assert_eq!(broker.stats().shared_groups, 1);
    drop(c);
    wait_for("the group is gone", || broker.stats().shared_groups == 0).await;
}

#[tokio::test]
async fn no_retained_message_is_sent_for_a_shared_subscription() {
    let (broker, _) = broker();
    broker.publish(Message::new("r/x", "retained", 1, true));
    let mut c = member(&broker, "c", "$share/g/r/#").await;
    broker.publish(Message::new("r/y", "live", 1, false));
    let (topic, payload, _, retain, _) = c.next_publish().await;
    assert_eq!(
        (topic.as_str(), payload.as_str(), retain),
        ("r/y", "live", false)
    );
    // An ordinary subscription of the same client does get it.
    c.subscribe("r/#", 1).await;
    let (topic, _, _, retain, _) = c.next_publish().await;
    assert_eq!((topic.as_str(), retain), ("r/x", true));
}

/// SUBSCRIBE (v5, packet id 7, QoS 1) to `filter`, as raw bytes: the client library refuses to
/// encode some invalid shared filters.
async fn raw_subscribe_v5(c: &mut RawClient, filter: &str) {
    use tokio::io::AsyncWriteExt;
    let mut body = vec![0u8, 7, 0];
    body.extend(u16::try_from(filter.len()).expect("short").to_be_bytes());
    body.extend(filter.as_bytes());
    body.push(1);
    let mut packet = vec![0x82u8, u8::try_from(body.len()).expect("short")];
    packet.extend(body);
    c.io.write_all(&packet).await.expect("write");
}

#[tokio::test]
async fn invalid_shared_filters_are_refused() {
    let (broker, _) = broker();
    // A share name that is empty or holds `+` / `#`, no `/` after it, nothing or an invalid
    // filter after that.
    let bad = [
        "$share/g",
        "$share/g/",
        "$share//t",
        "$share/g+/t",
        "$share/+/t",
        "$share/g#/t",
        "$share/#/t",
        "$share/g/a/#/b",
        "$share/g/a+",
    ];
    // v5 makes these malformed (§4.8.2): mqtt-protocol-core refuses the packet while decoding
    // and the connection closes (with DISCONNECT 0x81 where it sends one).
    for filter in bad {
        let mut c = RawClient::open(&broker, true);
        c.connect("v5").await;
        raw_subscribe_v5(&mut c, filter).await;
        match c.recv().await {
            Some(GenericPacket::V5_0Disconnect(d)) => {
                assert_eq!(d.reason_code(), Some(DisconnectReasonCode::MalformedPacket));
                assert!(c.recv().await.is_none(), "{filter}: connection closed");
            }
            None => {}
            other => panic!("{filter}: expected the connection closed, got {other:?}"),
        }
    }
    // v3.1.1: refused in the SUBACK (0x80); the connection stays.
    let mut v3 = RawClient::open(&broker, false);
    v3.connect("v3").await;
    for filter in bad {
        assert_eq!(
            suback_code(&v3.subscribe(filter, 1).await),
            SubackReturnCode::Failure as u8,
            "{filter}"
        );
    }
    assert_eq!(suback_code(&v3.subscribe("$share/g/t", 1).await), 1);
    assert_eq!(broker.stats().shared_groups, 1);
}

#[tokio::test]
async fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let (broker, _) = broker();
    let mut c = RawClient::open(&broker, true);
    c.connect("c").await;
    let opts = SubOpts::new().set_qos(qos(1)).set_nl(true);
    match c.subscribe_opts("$share/g/t", opts).await {
        GenericPacket::V5_0Disconnect(d) => {
            assert_eq!(d.reason_code(), Some(DisconnectReasonCode::ProtocolError))
        }
        other => panic!("expected DISCONNECT 0x82, got {other:?}"),
    }
    assert!(c.recv().await.is_none(), "the connection is closed");
    assert_eq!(broker.stats().shared_groups, 0);
}

#[tokio::test]
async fn connack_says_shared_subscriptions_are_available_and_suback_grants_the_qos() {
    let (broker, _) = broker();
    let mut c = RawClient::open(&broker, true);
    match c.connect("c").await {
        GenericPacket::V5_0Connack(a) => {
            let available = a.props.iter().find_map(|p| match p {
                Property::SharedSubscriptionAvailable(v) => Some(v.val()),
                _ => None,
            });
            assert_eq!(available, Some(1));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    for q in 0..=2 {
        assert_eq!(
            suback_code(&c.subscribe(&format!("$share/g{q}/t"), q).await),
            q
        );
    }
}

#[tokio::test]
async fn v311_clients_may_share_too() {
    let (broker, _) = broker();
    let mut a = RawClient::open(&broker, false);
    a.connect("a").await;
    assert_eq!(suback_code(&a.subscribe("$share/g/t", 1).await), 1);
    let mut b = RawClient::open(&broker, false);
    b.connect("b").await;
    assert_eq!(suback_code(&b.subscribe("$share/g/t", 2).await), 2);
    publish_numbered(&broker, "t", 2).await;
    assert_eq!(payloads(&mut a, 1).await, ["0"]);
    let (_, payload, granted, _, _) = b.next_publish().await;
    assert_eq!((payload.as_str(), granted), ("1", 1));
}

#[tokio::test]
async fn groups_of_different_principals_never_split_each_others_stream() {
    let broker = broker_with_principals(BrokerConfig::default());
    let filter = "$share/workers/devices/+/telemetry";
    let mut workers = Vec::new();
    for (user, id) in [("svc:a", "a1"), ("svc:a", "a2"), ("svc:b", "b1")] {
        let mut c = RawClient::open(&broker, true);
        connect_as(&mut c, user, id, true, 0).await;
        assert_eq!(suback_code(&c.subscribe(filter, 1).await), 1);
        workers.push(c);
    }
    assert_eq!(broker.stats().shared_groups, 2);
    let mut d = RawClient::open(&broker, true);
    connect_as(&mut d, "dev:d1", "d1", true, 0).await;
    for i in 0..4 {
        d.publish("devices/d1/telemetry", &i.to_string(), 1, false)
            .await;
    }
    let mut b1 = workers.pop().expect("b1");
    assert_eq!(
        payloads(&mut b1, 4).await,
        ["0", "1", "2", "3"],
        "svc:b's group gets every message, whoever else uses the name"
    );
    assert_eq!(payloads(&mut workers[0], 2).await, ["0", "2"]);
    assert_eq!(payloads(&mut workers[1], 2).await, ["1", "3"]);
}

#[tokio::test]
async fn the_embedder_judges_the_full_shared_filter() {
    // The test hooks let a device share only within its own subtree, like mooring's policy.
    let broker = broker_with_principals(BrokerConfig::default());
    let mut d = RawClient::open(&broker, true);
    connect_as(&mut d, "dev:d1@s1", "d1", true, 0).await;
    assert_eq!(
        suback_code(&d.subscribe("$share/g/devices/d1/#", 1).await),
        1
    );
    for filter in ["$share/g/devices/d2/#", "$share/g/sites/s1/#"] {
        assert_eq!(
            suback_code(&d.subscribe(filter, 1).await),
            SubackReasonCode::NotAuthorized as u8,
            "{filter}"
        );
    }
    assert_eq!(suback_code(&d.subscribe("sites/s1/#", 1).await), 1);
}

#[tokio::test]
async fn shared_subscriptions_count_against_the_per_session_quota() {
    let (broker, _) = broker_with(BrokerConfig {
        subscriptions_per_session_max: 2,
        ..BrokerConfig::default()
    });
    let mut c = RawClient::open(&broker, true);
    c.connect("c").await;
    assert_eq!(suback_code(&c.subscribe("a", 1).await), 1);
    assert_eq!(suback_code(&c.subscribe("$share/g/b", 1).await), 1);
    assert_eq!(
        suback_code(&c.subscribe("$share/h/b", 1).await),
        SubackReasonCode::QuotaExceeded as u8
    );
    // Subscribing again to a held one replaces it.
    assert_eq!(suback_code(&c.subscribe("$share/g/b", 0).await), 0);
    assert_eq!(broker.stats().shared_groups, 1);
}

/// Everything allowed for the dev principal, except `$share/.../broadcast/...` while `deny` is set.
struct Switch(AtomicBool);

#[async_trait::async_trait]
impl Hooks for Switch {
    async fn authenticate(&self, req: ConnectRequest<'_>) -> Result<Authenticated, ConnectRefusal> {
        Ok(Authenticated {
            client_id: req.client_id.to_string(),
            principal: Principal::Dev,
        })
    }
    fn may_publish(&self, _: &Principal, _: &str) -> bool {
        true
    }
    fn may_subscribe(&self, _: &Principal, filter: &str) -> bool {
        let shared = mooring_proto::topic::parse_shared_filter(filter);
        !(self.0.load(Ordering::SeqCst)
            && shared.is_some_and(|s| s.filter.starts_with("broadcast/")))
    }
    async fn on_publish(&self, _: &Principal, _: &str, _: &Message) -> PublishVerdict {
        PublishVerdict::Accept
    }
    fn on_connected(&self, _: &str, _: &Principal) {}
    fn on_disconnected(&self, _: &str, _: &Principal) {}
}

#[tokio::test]
async fn a_policy_reload_revokes_shared_subscriptions_and_what_they_queued() {
    let hooks = Arc::new(Switch(AtomicBool::new(false)));
    let broker = Broker::new(BrokerConfig::default(), hooks.clone());
    let mut a = RawClient::open(&broker, true);
    a.connect_with("a", true, 0, None, 600).await;
    a.subscribe("$share/g/broadcast/#", 1).await;
    a.subscribe("$share/g/other/#", 1).await;
    a.disconnect().await;
    drop(a);
    wait_for("a is offline", || {
        broker.session_info("a").is_some_and(|i| !i.connected)
    })
    .await;
    broker.publish(Message::new("broadcast/x", "old-policy", 1, false));
    assert_eq!(broker.session_info("a").map(|i| i.queued), Some(1));
    hooks.0.store(true, Ordering::SeqCst);
    assert_eq!(broker.reauthorize_all(), 1);
    assert_eq!(broker.stats().shared_groups, 1);
    let mut a = RawClient::open(&broker, true);
    a.connect_with("a", false, 0, None, 600).await;
    broker.publish(Message::new("broadcast/y", "new-policy", 1, false));
    broker.publish(Message::new("other/z", "marker", 1, false));
    assert_eq!(a.next_publish().await.0, "other/z");
}
