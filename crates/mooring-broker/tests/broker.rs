//! Behavioural tests: real clients (mosquitto_pub/sub over TCP, raw mqtt-protocol-core clients in memory).

mod support;

use mqtt_protocol_core::mqtt::packet::GenericPacket;
use mqtt_protocol_core::mqtt::result_code::{
    ConnectReasonCode, DisconnectReasonCode, PubackReasonCode, SubackReasonCode, SubackReturnCode,
};
use std::process::Stdio;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

fn mosquitto_sub(port: u16, version: &str, args: &[&str]) -> tokio::process::Child {
    Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            version,
            "-v",
            "-W",
            "5",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub installed")
}

async fn mosquitto_pub(port: u16, version: &str, args: &[&str]) -> bool {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version])
        .args(args)
        .status()
        .await
        .expect("mosquitto_pub installed")
        .success()
}

async fn output(child: tokio::process::Child) -> String {
    let out = child
        .wait_with_output()
        .await
        .expect("mosquitto_sub output");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn mosquitto_pubsub_all_qos_both_versions_with_wildcards() {
    let (broker, _) = broker();
    let port = serve_tcp(&broker).await;
    for version in ["mqttv311", "mqttv5"] {
        for q in ["0", "1", "2"] {
            let id = format!("sub-{version}-{q}");
            let sub = mosquitto_sub(
                port,
                version,
                &[
                    "-i",
                    &id,
                    "-q",
                    q,
                    "-C",
                    "1",
                    "-t",
                    "site/+/temp",
                    "-t",
                    "other/#",
                ],
            );
            wait_for("subscription", || {
                broker
                    .session_info(&id)
                    .is_some_and(|s| s.subscriptions == 2)
            })
            .await;
            assert!(
                mosquitto_pub(port, version, &["-q", q, "-t", "site/a/temp", "-m", "21.5"]).await
            );
            assert_eq!(
                output(sub).await.trim(),
                "site/a/temp 21.5",
                "{version} qos {q}"
            );
        }
    }
    assert!(broker.stats().messages_in >= 6);
}

#[tokio::test]
async fn mosquitto_retained_set_delivered_on_subscribe_and_cleared() {
    let (broker, _) = broker();
    let port = serve_tcp(&broker).await;
    assert!(
        mosquitto_pub(
            port,
            "mqttv311",
            &["-r", "-q", "1", "-t", "r/x", "-m", "kept"]
        )
        .await
    );
    for version in ["mqttv311", "mqttv5"] {
        let sub = mosquitto_sub(port, version, &["-C", "1", "-t", "r/#", "-F", "%t %p %r"]);
        assert_eq!(output(sub).await.trim(), "r/x kept 1");
    }
    assert!(mosquitto_pub(port, "mqttv5", &["-r", "-t", "r/x", "-n"]).await);
    wait_for("retained cleared", || broker.stats().retained == 0).await;
}

#[tokio::test]
async fn will_published_on_abnormal_close_not_on_disconnect() {
    let (broker, _) = broker();
    for v5 in [false, true] {
        let mut watcher = RawClient::open(&broker, v5);
        watcher.connect("watcher").await;
        watcher.subscribe("wills/#", 1).await;

        let mut normal = RawClient::open(&broker, v5);
        normal
            .connect_with("normal", true, 0, Some(("wills/normal", "gone")), 0)
            .await;
        normal.disconnect().await;
        wait_for("normal session gone", || {
            broker.session_info("normal").is_none()
        })
        .await;

        let mut dying = RawClient::open(&broker, v5);
        dying
            .connect_with("dying", true, 0, Some(("wills/dying", "lost")), 0)
            .await;
        drop(dying); // socket closed without DISCONNECT

        let got = watcher.recv().await.expect("will");
        assert_eq!(
            as_publish(&got).map(|p| (p.0, p.1)),
            Some(("wills/dying".into(), "lost".into()))
        );
        watcher.disconnect().await;
        wait_for("watcher gone", || broker.session_info("watcher").is_none()).await;
    }
}

#[tokio::test]
async fn persistent_session_gets_queued_qos1_with_session_present_and_clean_discards() {
    let (broker, _) = broker();
    for v5 in [false, true] {
        let expiry = if v5 { 300 } else { 0 };
        let mut c = RawClient::open(&broker, v5);
        c.connect_with("persist", false, 0, None, expiry).await;
        c.subscribe("q/#", 1).await;
        c.disconnect().await;
        wait_for("offline", || {
            broker.session_info("persist").is_some_and(|s| !s.connected)
        })
        .await;

        let mut p = RawClient::open(&broker, v5);
        p.connect("pub").await;
        p.publish("q/1", "one", 1, false).await;
        p.publish("q/2", "two", 1, false).await;
        p.publish("q/0", "zero", 0, false).await;
        wait_for("queued", || {
            broker
                .session_info("persist")
                .is_some_and(|s| s.queued == 2)
        })
        .await;

        let mut c = RawClient::open(&broker, v5);
        let connack = c.connect_with("persist", false, 0, None, expiry).await;
        let present = match &connack {
            GenericPacket::V3_1_1Connack(a) => a.session_present(),
            GenericPacket::V5_0Connack(a) => a.session_present(),
            other => panic!("expected CONNACK, got {other:?}"),
        };
        assert!(present, "session present");
        let a = as_publish(&c.recv().await.expect("q/1")).expect("publish");
        let b = as_publish(&c.recv().await.expect("q/2")).expect("publish");
        assert_eq!((a.0.as_str(), a.2, b.0.as_str()), ("q/1", 1, "q/2"));

        // Clean start discards the session.
        c.disconnect().await;
        wait_for("offline again", || {
            broker.session_info("persist").is_some_and(|s| !s.connected)
        })
        .await;
        p.publish("q/3", "three", 1, false).await;
        wait_for("queued again", || {
            broker
                .session_info("persist")
                .is_some_and(|s| s.queued == 1)
        })
        .await;
        let mut c = RawClient::open(&broker, v5);
        let connack = c.connect_with("persist", true, 0, None, 0).await;
        let present = match &connack {
            GenericPacket::V3_1_1Connack(a) => a.session_present(),
            GenericPacket::V5_0Connack(a) => a.session_present(),
            other => panic!("expected CONNACK, got {other:?}"),
        };
        assert!(!present);
        assert!(c.ping().await.is_some_and(|p| matches!(
            p,
            GenericPacket::V3_1_1Pingresp(_) | GenericPacket::V5_0Pingresp(_)
        )));
        c.disconnect().await;
        p.disconnect().await;
        wait_for("all gone", || broker.stats().sessions == 0).await;
    }
}

#[tokio::test]
async fn unacked_qos1_is_redelivered_with_dup_on_resume() {
    let (broker, _) = broker();
    let mut c = RawClient::open(&broker, true);
    c.mqtt.set_auto_pub_response(false);
    c.connect_with("dup", false, 0, None, 300).await;
    c.subscribe("d/#", 1).await;
    broker.publish(mooring_broker::Message::new("d/1", "x", 1, false));
    let first = as_publish(&c.recv().await.expect("first")).expect("publish");
    assert!(!first.4);
    drop(c); // no PUBACK
    wait_for("offline", || {
        broker
            .session_info("dup")
            .is_some_and(|s| !s.connected && s.inflight == 1)
    })
    .await;
    let mut c = RawClient::open(&broker, true);
    c.connect_with("dup", false, 0, None, 300).await;
    let again = as_publish(&c.recv().await.expect("redelivery")).expect("publish");
    assert_eq!((again.0.as_str(), again.4), ("d/1", true));
    wait_for("acked", || {
        broker.session_info("dup").is_some_and(|s| s.inflight == 0)
    })
    .await;
}

#[tokio::test]
async fn takeover_closes_old_connection_with_0x8e() {
    let (broker, hooks) = broker();
    let mut old = RawClient::open(&broker, true);
    old.connect("same").await;
    let mut new = RawClient::open(&broker, true);
    new.connect("same").await;
    match old.recv().await {
        Some(GenericPacket::V5_0Disconnect(d)) => {
            assert_eq!(
                d.reason_code(),
                Some(DisconnectReasonCode::SessionTakenOver)
            )
        }
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert!(old.recv().await.is_none(), "old connection closed");
    assert!(new.ping().await.is_some());
    let events = hooks.events.lock().expect("events").clone();
    assert_eq!(
        events,
        ["connected same", "disconnected same", "connected same"]
    );
}

#[tokio::test]
async fn v5_denied_qos1_publish_gets_0x87_and_stays_connected() {
    let (broker, _) = broker();
    let mut c = RawClient::open(&broker, true);
    c.connect("denied5").await;
    c.publish("forbidden/x", "no", 1, false).await;
    match c.recv().await {
        Some(GenericPacket::V5_0Puback(a)) => {
            assert_eq!(a.reason_code(), Some(PubackReasonCode::NotAuthorized))
        }
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }
    assert!(c
        .ping()
        .await
        .is_some_and(|p| matches!(p, GenericPacket::V5_0Pingresp(_))));
    assert_eq!(broker.stats().denied, 1);
}

#[tokio::test]
async fn v3_denied_publish_closes_connection() {
    let (broker, _) = broker();
    let mut c = RawClient::open(&broker, false);
    c.connect("denied3").await;
    c.publish("forbidden/x", "no", 1, false).await;
    assert!(c.recv().await.is_none(), "connection closed");
}

#[tokio::test]
async fn denied_subscribe_entry_fails_others_granted() {
    let (broker, _) = broker();
    for v5 in [false, true] {
        let mut c = RawClient::open(&broker, v5);
        c.connect("subber").await;
        let ok = c.subscribe("open/#", 1).await;
        let denied = c.subscribe("secret/#", 1).await;
        let invalid = c.subscribe("bad/#/x", 1).await;
        match (ok, denied, invalid) {
            (
                GenericPacket::V3_1_1Suback(a),
                GenericPacket::V3_1_1Suback(b),
                GenericPacket::V3_1_1Suback(i),
            ) => {
                assert_eq!(a.return_codes(), vec![SubackReturnCode::SuccessMaximumQos1]);
                assert_eq!(b.return_codes(), vec![SubackReturnCode::Failure]);
                assert_eq!(i.return_codes(), vec![SubackReturnCode::Failure]);
            }
            (
                GenericPacket::V5_0Suback(a),
                GenericPacket::V5_0Suback(b),
                GenericPacket::V5_0Suback(i),
            ) => {
                assert_eq!(a.reason_codes(), vec![SubackReasonCode::GrantedQos1]);
                assert_eq!(b.reason_codes(), vec![SubackReasonCode::NotAuthorized]);
                assert_eq!(i.reason_codes(), vec![SubackReasonCode::TopicFilterInvalid]);
            }
            other => panic!("unexpected {other:?}"),
        }
        c.disconnect().await;
        wait_for("gone", || broker.session_info("subber").is_none()).await;
    }
}

#[tokio::test]
async fn rejected_publish_gets_reason_0x99_on_v5_and_is_not_routed() {
    let (broker, _) = broker();
    let mut c = RawClient::open(&broker, true);
    c.connect("checker").await;
    c.subscribe("check/#", 1).await;
    c.publish("check/1", "bad", 1, false).await;
    match c.recv().await {
        Some(GenericPacket::V5_0Puback(a)) => {
            assert_eq!(
                a.reason_code(),
                Some(PubackReasonCode::PayloadFormatInvalid)
            )
        }
        other => panic!("expected PUBACK 0x99, got {other:?}"),
    }
    c.publish("check/1", "good", 1, false).await;
    // Own message comes back (no-local not set); the rejected one never does.
    let mut got = Vec::new();
    for _ in 0..2 {
        let p = c.recv().await.expect("packet");
        if let Some(p) = as_publish(&p) {
            got.push(p.1);
        }
    }
    assert_eq!(got, ["good"]);
}

#[tokio::test]
async fn bad_password_is_refused_with_0x86() {
    let (broker, _) = broker();
    let mut c = RawClient::open(&broker, true);
    let p = mqtt_protocol_core::mqtt::packet::v5_0::Connect::builder()
        .client_id("pw")
        .expect("id")
        .user_name("u")
        .expect("user")
        .password("wrong")
        .expect("pw")
        .build()
        .expect("connect");
    c.send(p.into()).await;
    match c.recv().await {
        Some(GenericPacket::V5_0Connack(a)) => {
            assert_eq!(a.reason_code(), ConnectReasonCode::BadUserNameOrPassword)
        }
        other => panic!("expected CONNACK 0x86, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn keepalive_expiry_closes_connection_on_virtual_time() {
    let (broker, hooks) = broker();
    let mut c = RawClient::open(&broker, false);
    c.connect_with("sleepy", true, 10, Some(("wills/sleepy", "timeout")), 0)
        .await;
    let mut w = RawClient::open(&broker, false);
    w.connect("watch").await;
    w.subscribe("wills/#", 0).await;
    // Nothing sent by `sleepy`: after 1.5 × 10 s of virtual time the broker closes it.
    assert!(c.recv().await.is_none(), "closed by keepalive");
    let will = as_publish(&w.recv().await.expect("will")).expect("publish");
    assert_eq!(will.0, "wills/sleepy");
    assert!(hooks
        .events
        .lock()
        .expect("events")
        .contains(&"disconnected sleepy".to_string()));
}

#[tokio::test]
async fn garbage_or_panic_on_one_connection_does_not_affect_others() {
    let (broker, hooks) = broker();
    let mut good = RawClient::open(&broker, true);
    good.connect("good").await;
    good.subscribe("t/#", 0).await;

    let mut bad = RawClient::open(&broker, true);
    bad.connect("bad").await;
    bad.io
        .write_all(&[0xF0, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0x02])
        .await
        .expect("write garbage");
    while bad.recv().await.is_some() {}

    let (b2, s2) = tokio::io::duplex(1024);
    let bb = broker.clone();
    let pre_connect = tokio::spawn(async move { bb.serve_connection(s2, dev_info()).await });
    let mut b2 = b2;
    b2.write_all(b"\x10\xff\xff\xff\xffgarbage")
        .await
        .expect("write");
    pre_connect.await.expect("serve_connection returned");

    let mut panicky = RawClient::open(&broker, false);
    panicky.connect("panicky").await;
    panicky.publish("panic/now", "boom", 1, false).await;
    assert!(
        panicky.recv().await.is_none(),
        "panicking connection closed"
    );
    wait_for("panic contained and cleaned up", || {
        broker.stats().panics == 1 && broker.session_info("panicky").is_none()
    })
    .await;
    assert!(hooks
        .events
        .lock()
        .expect("events")
        .contains(&"disconnected panicky".to_string()));

    let mut p = RawClient::open(&broker, false);
    p.connect("pub").await;
    p.publish("t/1", "still alive", 0, false).await;
    let got = as_publish(&good.recv().await.expect("message")).expect("publish");
    assert_eq!(got.1, "still alive");
}

#[tokio::test]
async fn shutdown_disconnects_v5_clients_with_0x8b() {
    let (broker, hooks) = broker();
    let mut c = RawClient::open(&broker, true);
    c.connect("bye").await;
    broker.shutdown().await;
    match c.recv().await {
        Some(GenericPacket::V5_0Disconnect(d)) => {
            assert_eq!(
                d.reason_code(),
                Some(DisconnectReasonCode::ServerShuttingDown)
            )
        }
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    assert_eq!(broker.stats().connections, 0);
    assert!(hooks
        .events
        .lock()
        .expect("events")
        .contains(&"disconnected bye".to_string()));
}
