//! Inbound flow control: a client with more QoS 1/2 messages in flight than the broker processes
//! at once is slowed down (its socket is not read), never closed.

mod support;

use mqtt_protocol_core::mqtt::packet::GenericPacket;
use support::*;

#[tokio::test]
async fn a_v311_client_with_more_in_flight_than_inflight_max_gets_every_puback() {
    let (broker, _hooks) = broker();
    let max = usize::from(broker.config().inflight_max);
    let mut c = RawClient::open(&broker, false);
    c.connect("busy").await;
    // v3.1.1 has no Receive Maximum: Mosquitto accepts 200 in flight; so must we.
    let n = 200;
    assert!(n > max);
    for i in 0..n {
        c.publish(&format!("t/{i}"), "x", 1, false).await;
    }
    let mut acked = 0;
    while acked < n {
        match c.recv().await {
            Some(GenericPacket::V3_1_1Puback(_)) => acked += 1,
            Some(_) => {}
            None => panic!("closed after {acked} PUBACKs"),
        }
    }
    assert_eq!(broker.stats().messages_in, n as u64);
}

#[tokio::test]
async fn a_v5_client_is_told_receive_maximum_and_held_to_it() {
    use mqtt_protocol_core::mqtt::packet::Property;
    use mqtt_protocol_core::mqtt::result_code::DisconnectReasonCode;
    let (broker, _hooks) = broker();
    let max = broker.config().inflight_max;
    let mut c = RawClient::open(&broker, true);
    match c.connect("v5").await {
        GenericPacket::V5_0Connack(a) => {
            let advertised = a.props().iter().find_map(|p| match p {
                Property::ReceiveMaximum(v) => Some(v.val()),
                _ => None,
            });
            assert_eq!(advertised, Some(max));
        }
        other => panic!("CONNACK: {other:?}"),
    }
    // Over the advertised maximum in one burst (raw bytes: the test client's library would hold
    // them back): a protocol error for v5 (0x93), as specified.
    use tokio::io::AsyncWriteExt;
    let mut burst = Vec::new();
    for id in 1..=max + 8 {
        let [hi, lo] = id.to_be_bytes();
        // PUBLISH QoS 1, topic "t", packet id, no properties, payload "x".
        burst.extend_from_slice(&[0x32, 0x07, 0x00, 0x01, b't', hi, lo, 0x00, b'x']);
    }
    c.io.write_all(&burst).await.expect("burst");
    let mut last = None;
    while let Some(p) = c.recv().await {
        last = Some(p);
    }
    match last {
        Some(GenericPacket::V5_0Disconnect(d)) => assert_eq!(
            d.reason_code(),
            Some(DisconnectReasonCode::ReceiveMaximumExceeded)
        ),
        other => panic!("expected DISCONNECT 0x93, got {other:?}"),
    }
}

#[tokio::test]
async fn wildcards_at_the_first_level_never_match_dollar_topics() {
    let (broker, _hooks) = broker();
    let mut all = RawClient::open(&broker, false);
    all.connect("all").await;
    all.subscribe("#", 1).await;
    all.subscribe("+/x", 1).await;
    let mut sys = RawClient::open(&broker, false);
    sys.connect("sys").await;
    sys.subscribe("$SYS/#", 1).await;
    // A v3.1.1 QoS 1 publish to a `$` topic is acknowledged like any other.
    let mut p = RawClient::open(&broker, false);
    p.connect("pub").await;
    p.publish("$SYS/x", "dollar", 1, false).await;
    assert!(matches!(
        p.recv().await,
        Some(GenericPacket::V3_1_1Puback(_))
    ));
    p.publish("a/x", "plain", 1, false).await;
    assert_eq!(sys.next_publish().await.1, "dollar");
    // `#` and `+/x` saw only the plain topic (once: one delivery per session).
    assert_eq!(all.next_publish().await.1, "plain");
    all.subscribe("marker", 0).await;
    p.publish("marker", "m", 0, false).await;
    assert_eq!(all.next_publish().await.1, "m");
}

#[tokio::test]
async fn connack_says_server_keep_alive_whenever_the_server_uses_another_value() {
    use mooring_broker::BrokerConfig;
    use mqtt_protocol_core::mqtt::packet::Property;
    let (broker, _hooks) = broker_with(BrokerConfig {
        keepalive_secs_max: 600,
        ..BrokerConfig::default()
    });
    for (asked, told) in [
        (0u16, Some(600u16)),
        (601, Some(600)),
        (600, None),
        (30, None),
    ] {
        let mut c = RawClient::open(&broker, true);
        match c
            .connect_with(&format!("ka{asked}"), true, asked, None, 0)
            .await
        {
            GenericPacket::V5_0Connack(a) => {
                let server_keep_alive = a.props().iter().find_map(|p| match p {
                    Property::ServerKeepAlive(v) => Some(v.val()),
                    _ => None,
                });
                assert_eq!(server_keep_alive, told, "asked for {asked}");
            }
            other => panic!("CONNACK: {other:?}"),
        }
    }
}
