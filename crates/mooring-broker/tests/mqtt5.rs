//! MQTT 5 features beyond the basics: subscription identifiers, topic aliases.

mod support;

use mooring_broker::Message;
use mqtt_protocol_core::mqtt;
use mqtt_protocol_core::mqtt::packet::{
    v5_0, GenericPacket, GenericPacketTrait, Property, SubEntry, SubOpts,
};
use support::*;
use tokio::io::AsyncWriteExt;

/// SUBSCRIBE `filter` (QoS 1) with Subscription Identifier `id`.
async fn subscribe_with_id(c: &mut RawClient, filter: &str, id: u32) {
    let pid = c.mqtt.acquire_packet_id().expect("pid");
    let entry = SubEntry::new(filter, SubOpts::new().set_qos(qos(1))).expect("entry");
    let p: GenericPacket<u16> = v5_0::Subscribe::builder()
        .packet_id(pid)
        .entries(vec![entry])
        .props(vec![mqtt::packet::SubscriptionIdentifier::new(id)
            .expect("id")
            .into()])
        .build()
        .expect("subscribe")
        .into();
    c.send(p).await;
    assert!(matches!(c.recv().await, Some(GenericPacket::V5_0Suback(_))));
}

/// The next PUBLISH's topic and Subscription Identifiers.
async fn next_ids(c: &mut RawClient) -> (String, Vec<u32>) {
    loop {
        match c.recv().await {
            Some(GenericPacket::V5_0Publish(p)) => {
                let ids = p
                    .props()
                    .iter()
                    .filter_map(|prop| match prop {
                        Property::SubscriptionIdentifier(v) => Some(v.val()),
                        _ => None,
                    })
                    .collect();
                return (p.topic_name().to_string(), ids);
            }
            Some(_) => {}
            None => panic!("closed"),
        }
    }
}

#[tokio::test]
async fn every_matching_subscription_identifier_comes_with_the_message() {
    let (broker, _hooks) = broker();
    broker.publish(Message::new("r/kept", "retained", 1, true));
    let mut c = RawClient::open(&broker, true);
    c.connect("ids").await;
    subscribe_with_id(&mut c, "a/+", 5).await;
    subscribe_with_id(&mut c, "a/b", 9).await;
    subscribe_with_id(&mut c, "r/#", 11).await;
    // The retained message sent at SUBSCRIBE carries that subscription's id.
    assert_eq!(next_ids(&mut c).await, ("r/kept".to_owned(), vec![11]));
    broker.publish(Message::new("a/b", "both", 1, false));
    assert_eq!(next_ids(&mut c).await, ("a/b".to_owned(), vec![5, 9]));
    broker.publish(Message::new("a/c", "one", 1, false));
    assert_eq!(next_ids(&mut c).await, ("a/c".to_owned(), vec![5]));
    // A plain SUBSCRIBE has none: the filter's id goes away when it is subscribed again.
    c.subscribe("a/b", 1).await;
    broker.publish(Message::new("a/b", "again", 1, false));
    assert_eq!(next_ids(&mut c).await, ("a/b".to_owned(), vec![5]));
}

#[tokio::test]
async fn repeated_topics_go_out_as_topic_aliases_to_a_client_that_allows_them() {
    let (broker, _hooks) = broker();
    let mut c = RawClient::open(&broker, true);
    let connect: GenericPacket<u16> = v5_0::Connect::builder()
        .client_id("aliases")
        .expect("id")
        .clean_start(true)
        .props(vec![mqtt::packet::TopicAliasMaximum::new(2)
            .expect("tam")
            .into()])
        .build()
        .expect("connect")
        .into();
    c.send(connect).await;
    assert!(matches!(
        c.recv().await,
        Some(GenericPacket::V5_0Connack(_))
    ));
    c.subscribe("t/#", 0).await;
    let alias_of = |p: &v5_0::GenericPublish<u16>| {
        p.props().iter().find_map(|prop| match prop {
            Property::TopicAlias(v) => Some(v.val()),
            _ => None,
        })
    };
    let mut seen = Vec::new();
    for topic in ["t/long/topic/name", "t/long/topic/name", "t/other"] {
        broker.publish(Message::new(topic, "x", 0, false));
        match c.recv().await {
            Some(GenericPacket::V5_0Publish(p)) => {
                seen.push((p.topic_name().to_string(), alias_of(&p)))
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    // The first use sends topic and alias; a repeat sends the alias with an empty topic name
    // (the client library resolves it, so only the alias property is checked there).
    assert_eq!(seen[0], ("t/long/topic/name".to_owned(), Some(1)));
    assert_eq!(seen[1].1, Some(1));
    assert_eq!(seen[2], ("t/other".to_owned(), Some(2)));
}

#[tokio::test]
async fn a_client_that_sends_topic_alias_maximum_zero_is_served_without_aliases() {
    // MQTT 5.0 §3.1.2.11.5: 0 means "no aliases", like leaving the property out. The protocol
    // library panicked on it, so the client got no CONNACK (Paho interoperability suite).
    let (broker, _hooks) = broker();
    let mut c = RawClient::open(&broker, true);
    let connect: GenericPacket<u16> = v5_0::Connect::builder()
        .client_id("no-aliases")
        .expect("id")
        .clean_start(true)
        .props(vec![
            mqtt::packet::TopicAliasMaximum::new(0).expect("tam").into(),
            mqtt::packet::UserProperty::new("k", "v")
                .expect("up")
                .into(),
        ])
        .build()
        .expect("connect")
        .into();
    // Written in two pieces, so the broker has to put the CONNECT together first.
    let bytes = connect.to_continuous_buffer();
    let _ = c.mqtt.send(connect);
    let (head, tail) = bytes.split_at(bytes.len() / 2);
    c.io.write_all(head).await.expect("write");
    c.io.flush().await.expect("flush");
    tokio::task::yield_now().await;
    c.io.write_all(tail).await.expect("write");
    match c.recv().await {
        Some(GenericPacket::V5_0Connack(ack)) => {
            assert_eq!(
                ack.reason_code(),
                mqtt::result_code::ConnectReasonCode::Success
            )
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c.subscribe("t/#", 0).await;
    for _ in 0..2 {
        broker.publish(Message::new("t/one", "x", 0, false));
        match c.recv().await {
            Some(GenericPacket::V5_0Publish(p)) => {
                assert_eq!(p.topic_name(), "t/one");
                assert!(!p
                    .props()
                    .iter()
                    .any(|prop| matches!(prop, Property::TopicAlias(_))));
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}
