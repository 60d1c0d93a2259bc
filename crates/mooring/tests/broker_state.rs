//! Broker state that survives restarts, against the real binary: retained messages and
//! persistent sessions (subscriptions, queued QoS 1/2 messages, unacknowledged QoS 2 state) are
//! kept across `kill -9`, every acknowledged message arrives exactly once per the QoS rules, and
//! session expiry keeps running while the server is down. Clients: mosquitto_pub/sub and a raw
//! socket (so the test decides when to acknowledge).

mod support;

use mooring_broker::test_support::raw3::{packet, string, Pkt, Raw3};
use std::time::Duration;
use support::*;
use tokio::net::TcpStream;

fn publish(args: Vec<String>) {
    let out = mosquitto_pub(&args);
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until every broker state change submitted so far is durable.
async fn state_settled(server: &Server) {
    server
        .wait_metric("mooring_broker_state_queued_ops", |v| v == 0.0)
        .await;
}

#[tokio::test]
async fn acknowledged_retained_and_queued_messages_survive_kill_9_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let creds = server.create_device("d1", dir.path());
    let token = service_token(&server, "pipeline");
    // A data pipeline: a service with a persistent session (v3.1.1 clean_session=0 and v5
    // session expiry), subscribed at QoS 1 / QoS 2, then offline.
    for (id, version) in [("pipe-311", "mqttv311"), ("pipe-5", "mqttv5")] {
        let mut args = service_args(&server, &creds, &token, id);
        args.extend(s(&[
            "-V",
            version,
            "-c",
            "-q",
            "2",
            "-t",
            "devices/+/events",
        ]));
        if version == "mqttv5" {
            args.extend(s(&["-x", "3600"]));
        }
        let mut sub = Sub::start(&args);
        sub.kill9();
    }
    // Acknowledged (mosquitto_pub exits 0 only after PUBACK / PUBCOMP) while they are offline.
    for i in 1..=5 {
        let qos = if i % 2 == 0 { "2" } else { "1" };
        let mut args = creds.mosquitto_args(server.mqtt);
        args.extend(s(&[
            "-V",
            "mqttv5",
            "-i",
            "d1",
            "-q",
            qos,
            "-t",
            "devices/d1/events",
            "-m",
            &format!("m{i}"),
        ]));
        publish(args);
    }
    let mut args = creds.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-V",
        "mqttv5",
        "-i",
        "d1",
        "-q",
        "1",
        "-r",
        "-t",
        "devices/d1/status",
        "-m",
        "online",
    ]));
    publish(args);
    // Retained on the dev listener too (and a cleared one stays cleared).
    let mut args = dev_args(&server);
    args.extend(s(&["-q", "1", "-r", "-t", "plant/line1", "-m", "running"]));
    publish(args);
    let mut args = dev_args(&server);
    args.extend(s(&["-q", "1", "-r", "-t", "plant/gone", "-m", "x"]));
    publish(args);
    let mut args = dev_args(&server);
    args.extend(s(&["-q", "1", "-r", "-t", "plant/gone", "-n"]));
    publish(args);

    let data_dir = server.data_dir.clone();
    server.kill9();
    let server = Server::start(&data_dir);
    assert!(
        server.log_text().contains("broker state restored"),
        "{}",
        server.log_text()
    );

    // Each resumed session gets every acknowledged message once, then (as the marker shows)
    // nothing more. pipe-5 also holds the marker published while pipe-311 was checked.
    let mut expected: Vec<String> = (1..=5).map(|i| format!("m{i}")).collect();
    for (id, version, marker) in [
        ("pipe-311", "mqttv311", "after-1"),
        ("pipe-5", "mqttv5", "after-2"),
    ] {
        // Resume without subscribing again: the stored subscription delivers.
        let mut args = service_args(&server, &creds, &token, id);
        args.extend(s(&["-V", version, "-c", "-q", "2", "-t", "devices/none/x"]));
        if version == "mqttv5" {
            args.extend(s(&["-x", "3600"]));
        }
        let mut sub = Sub::spawn(&args);
        let mut got: Vec<String> = expected.iter().map(|_| sub.next_message()).collect();
        // mosquitto_sub prints a QoS 2 message only once its PUBREL arrives, so the printed
        // order interleaves; what counts is that each arrives, once.
        got.sort();
        let mut want = expected.clone();
        want.sort();
        assert_eq!(got, want, "{id}");
        let mut args = creds.mosquitto_args(server.mqtt);
        args.extend(s(&[
            "-V",
            "mqttv5",
            "-i",
            "d1",
            "-q",
            "1",
            "-t",
            "devices/d1/events",
            "-m",
            marker,
        ]));
        publish(args);
        assert_eq!(sub.next_message(), marker, "{id}");
        sub.kill9();
        expected.push(marker.to_owned());
    }

    // Retained messages are back, for any new subscriber.
    let mut args = service_args(&server, &creds, &token, "reader");
    args.extend(s(&["-t", "devices/d1/status", "-C", "1", "-W", "10"]));
    let out = std::process::Command::new("mosquitto_sub")
        .args(&args)
        .output()
        .expect("mosquitto_sub");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "online");
    let mut args = dev_args(&server);
    args.extend(s(&["-v", "-t", "plant/#", "-C", "1", "-W", "10"]));
    let out = std::process::Command::new("mosquitto_sub")
        .args(&args)
        .output()
        .expect("mosquitto_sub");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "plant/line1 running",
        "the cleared retained message must not come back"
    );
}

/// A raw MQTT 3.1.1 client on the dev listener, persistent session (clean_session=0) under
/// `client_id`: the test decides when to acknowledge. Returns the client and session present.
async fn connect(server: &Server, client_id: &str) -> (Raw3<TcpStream>, bool) {
    let tcp = TcpStream::connect(server.mqtt_dev)
        .await
        .expect("dev listener");
    let mut raw = Raw3::new(tcp).wait_each(WAIT);
    let present = raw.connect(client_id, false).await;
    (raw, present)
}

#[tokio::test]
async fn qos2_outbound_state_survives_kill_9_so_each_message_is_delivered_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let (mut sub, present) = connect(&server, "q2-sink").await;
    assert!(!present);
    sub.subscribe("q2/#", 2).await;
    drop(sub);
    for m in ["a", "b"] {
        let mut args = dev_args(&server);
        args.extend(s(&["-q", "2", "-t", &format!("q2/{m}"), "-m", m]));
        publish(args);
    }
    // Online again: "a" is received and PUBREC'd (the server moves on to PUBREL); "b" is
    // received and not acknowledged at all.
    let (mut sub, present) = connect(&server, "q2-sink").await;
    assert!(present);
    let pid_a = sub.expect_qos2(b"a").await;
    let pid_b = sub.expect_qos2(b"b").await;
    sub.ack(0x50, pid_a).await; // PUBREC
    assert_eq!(sub.next().await, Some(Pkt::PubRel { pid: pid_a }));
    state_settled(&server).await;

    let data_dir = server.data_dir.clone();
    server.kill9();
    drop(sub);
    let server = Server::start(&data_dir);
    let (mut sub, present) = connect(&server, "q2-sink").await;
    assert!(present, "the persistent session survived");
    // "a": only its PUBREL again (it was received; sending it again would deliver it twice).
    // "b": sent again under the same packet id, so a receiver that already has it knows it.
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(sub.next().await.expect("packet"));
    }
    assert!(got.contains(&Pkt::PubRel { pid: pid_a }), "{got:?}");
    let b = got
        .iter()
        .find_map(|p| match p {
            Pkt::Publish {
                pid,
                payload,
                qos: 2,
                topic,
                ..
            } => Some((*pid, payload.clone(), topic.clone())),
            _ => None,
        })
        .expect("b again");
    assert_eq!(b, (pid_b, b"b".to_vec(), "q2/b".to_owned()));
    assert!(
        !got.iter()
            .any(|p| matches!(p, Pkt::Publish { payload, .. } if payload == b"a")),
        "{got:?}"
    );
    sub.ack(0x70, pid_a).await; // PUBCOMP
    sub.ack(0x50, pid_b).await; // PUBREC
    assert_eq!(sub.next().await, Some(Pkt::PubRel { pid: pid_b }));
    sub.ack(0x70, pid_b).await;
    // PINGRESP comes after the server has read the PUBCOMPs (packets are handled in order), so
    // the deletes they cause are submitted before the settle check below reads the queue.
    sub.ping().await;
    state_settled(&server).await;
    // Done with both: after another restart nothing comes again.
    let data_dir = server.data_dir.clone();
    server.kill9();
    drop(sub);
    let server = Server::start(&data_dir);
    let (mut sub, present) = connect(&server, "q2-sink").await;
    assert!(present);
    let mut args = dev_args(&server);
    args.extend(s(&["-q", "2", "-t", "q2/c", "-m", "c"]));
    publish(args);
    match sub.next().await {
        Some(Pkt::Publish { payload, .. }) => assert_eq!(payload, b"c", "nothing old comes back"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn inbound_qos2_state_survives_kill_9_so_a_resent_publish_is_not_routed_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let mut watcher = {
        let mut args = dev_args(&server);
        args.extend(s(&["-q", "2", "-t", "in/#", "-i", "watcher", "-c"]));
        Sub::start(&args)
    };
    // A persistent publisher sends a QoS 2 message and gets PUBREC, then the server dies before
    // its PUBREL.
    let (mut publisher, _) = connect(&server, "q2-source").await;
    let mut body = Vec::new();
    string("in/x", &mut body);
    body.extend_from_slice(&7u16.to_be_bytes());
    body.extend_from_slice(b"once");
    let publish_pkt = packet(0x34, &body);
    publisher.send(&publish_pkt).await;
    match publisher.next().await {
        Some(Pkt::Other(5)) => {} // PUBREC
        other => panic!("PUBREC: {other:?}"),
    }
    assert_eq!(watcher.next_message(), "once");
    watcher.kill9();
    state_settled(&server).await;
    let data_dir = server.data_dir.clone();
    server.kill9();
    drop(publisher);
    let server = Server::start(&data_dir);
    // The publisher did not see... it resends the PUBLISH (DUP) with the same id, then PUBREL.
    let (mut publisher, present) = connect(&server, "q2-source").await;
    assert!(present);
    let mut dup = publish_pkt.clone();
    dup[0] |= 0x08;
    publisher.send(&dup).await;
    assert_eq!(publisher.next().await, Some(Pkt::Other(5)));
    publisher.send(&packet(0x62, &7u16.to_be_bytes())).await; // PUBREL
    assert_eq!(publisher.next().await, Some(Pkt::Other(7))); // PUBCOMP
                                                             // The watcher's persistent session got "once" exactly once: the resend was not routed.
    let mut args = dev_args(&server);
    args.extend(s(&["-q", "2", "-t", "in/#", "-i", "watcher", "-c"]));
    let mut watcher = Sub::spawn(&args);
    watcher.wait_line(|l| l.contains("received SUBACK"));
    let mut marker = dev_args(&server);
    marker.extend(s(&["-q", "1", "-t", "in/marker", "-m", "marker"]));
    publish(marker);
    assert_eq!(watcher.next_message(), "marker");
}

#[tokio::test]
async fn session_expiry_keeps_running_while_the_server_is_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    // v5 sessions: one expires 2 s after disconnecting, one after an hour.
    for (id, expiry) in [("short", "2"), ("long", "3600")] {
        let mut args = dev_args(&server);
        args.extend(s(&[
            "-V", "mqttv5", "-c", "-x", expiry, "-i", id, "-q", "1", "-t", "exp/#",
        ]));
        let mut sub = Sub::start(&args);
        sub.kill9();
    }
    let mut args = dev_args(&server);
    args.extend(s(&["-q", "1", "-t", "exp/a", "-m", "queued"]));
    publish(args);
    state_settled(&server).await;
    let data_dir = server.data_dir.clone();
    server.stop();
    // Down for longer than the short session's expiry.
    std::thread::sleep(Duration::from_millis(2500));
    let server = Server::start(&data_dir);
    for (id, expiry, present) in [("short", "2", false), ("long", "3600", true)] {
        let mut args = dev_args(&server);
        args.extend(s(&[
            "-V", "mqttv5", "-c", "-x", expiry, "-i", id, "-q", "1", "-t", "other/x",
        ]));
        let mut sub = Sub::spawn(&args);
        if present {
            assert_eq!(sub.next_message(), "queued", "{id}");
        }
        sub.wait_line(|l| l.contains("received SUBACK"));
        let mut marker = dev_args(&server);
        marker.extend(s(&["-q", "1", "-t", "other/x", "-m", "marker"]));
        publish(marker);
        // An expired session came back empty (and without its exp/# subscription).
        assert_eq!(sub.next_message(), "marker", "{id}");
    }
}

#[tokio::test]
async fn an_offline_session_keeps_its_subscription_over_two_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let mut args = dev_args(&server);
    args.extend(s(&["-c", "-i", "twice", "-q", "1", "-t", "twice/#"]));
    let mut sub = Sub::start(&args);
    sub.kill9();
    state_settled(&server).await;
    let data_dir = server.data_dir.clone();
    server.kill9();
    // The first restart stores the restored session again; a second one (the client still
    // away) must find its subscription in that value.
    let server = Server::start(&data_dir);
    state_settled(&server).await;
    server.kill9();
    let server = Server::start(&data_dir);
    let mut args = dev_args(&server);
    args.extend(s(&["-q", "1", "-t", "twice/x", "-m", "after two restarts"]));
    publish(args);
    let mut args = dev_args(&server);
    args.extend(s(&["-c", "-i", "twice", "-q", "1", "-t", "other/x"]));
    let mut sub = Sub::spawn(&args);
    assert_eq!(sub.next_message(), "after two restarts");
}

#[tokio::test]
async fn the_will_of_a_persistent_session_cut_by_a_crash_fires_after_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let mut args = dev_args(&server);
    args.extend(s(&["-c", "-i", "watcher", "-q", "1", "-t", "wills/#"]));
    let mut watcher = Sub::start(&args);
    watcher.kill9();
    // Connected when the server dies: its connection ends without DISCONNECT.
    let mut args = dev_args(&server);
    args.extend(s(&[
        "-V",
        "mqttv5",
        "-c",
        "-x",
        "3600",
        "-i",
        "lock-7",
        "-q",
        "1",
        "-t",
        "x/y",
        "--will-topic",
        "wills/lock-7",
        "--will-payload",
        "gone",
        "--will-qos",
        "1",
    ]));
    let mut client = Sub::start(&args);
    state_settled(&server).await;
    let data_dir = server.data_dir.clone();
    server.kill9();
    client.kill9();
    let server = Server::start(&data_dir);
    assert!(
        server.log_text().contains("wills=1"),
        "{}",
        server.log_text()
    );
    let mut args = dev_args(&server);
    args.extend(s(&["-c", "-i", "watcher", "-q", "1", "-t", "wills/#"]));
    let mut watcher = Sub::spawn(&args);
    assert_eq!(watcher.next_message(), "gone");
}

#[tokio::test]
async fn sigterm_with_connected_clients_exits_at_once_and_keeps_their_sessions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path());
    let creds = server.create_device("d1", dir.path());
    let _device = device_sub(&server, &creds, "d1", "devices/d1/commands/+");
    let mut args = dev_args(&server);
    args.extend(s(&["-c", "-i", "keeper", "-q", "1", "-t", "keep/#"]));
    let _client = Sub::start(&args);
    let data_dir = server.data_dir.clone();
    let started = std::time::Instant::now();
    server.stop();
    let took = started.elapsed();
    // Nothing waits out a drain timeout any more (the writers end when the server's state is
    // dropped); the old shutdown took over 5 s here. Generous bound for a loaded machine.
    assert!(took < Duration::from_secs(3), "SIGTERM took {took:?}");
    let server = Server::start(&data_dir);
    let mut args = dev_args(&server);
    args.extend(s(&["-q", "1", "-t", "keep/x", "-m", "kept"]));
    publish(args);
    let mut args = dev_args(&server);
    args.extend(s(&["-c", "-i", "keeper", "-q", "1", "-t", "other/x"]));
    let mut client = Sub::spawn(&args);
    assert_eq!(client.next_message(), "kept");
}
