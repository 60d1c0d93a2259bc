//! Broker security and resource bounds, tried as an attacker would against the real binary with
//! real clients (mosquitto_pub/sub, rumqttc, raw sockets): who owns a session, policy that follows
//! tags and reloads, quotas, and connections that stop reading.

mod support;

use mooring_bench::client::{self as raw, Cred, Endpoint, Packet};
use std::process::Command;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts the server with a TOML config file written into `dir`.
fn start_configured(dir: &std::path::Path, toml: &str) -> Server {
    let cfg = config_args(dir, toml);
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    Server::start_with(&dir.join("data"), "127.0.0.1:0", "127.0.0.1:0", &cfg)
}

/// mosquitto_sub as a device (QoS 1, `-v`), optionally with a persistent session (`-c`).
fn device_subscriber(
    server: &Server,
    creds: &Creds,
    version: &str,
    id: &str,
    persistent: bool,
    filters: &[&str],
) -> Sub {
    let mut args = creds.mosquitto_args(server.mqtt);
    args.extend(s(&["-V", version, "-i", id, "-q", "1", "-v"]));
    if persistent {
        args.push("-c".into());
    }
    for f in filters {
        args.extend(s(&["-t", f]));
    }
    Sub::start(&args)
}

fn dev_pub(server: &Server, topic: &str, payload: &str) {
    let mut args = dev_args(server);
    args.extend(s(&["-q", "1", "-t", topic, "-m", payload]));
    let out = mosquitto_pub(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stderr(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
    .to_lowercase()
}

/// A raw MQTT 3.1.1 device connection over TLS (the bench client): full control of reading.
async fn raw_device(server: &Server, creds: &Creds, id: &str, keepalive_secs: u16) -> raw::Conn {
    let ca = std::fs::read_to_string(creds.ca()).expect("ca");
    let endpoint = Endpoint::new(server.mqtt, &ca).expect("endpoint");
    let cred = Cred {
        id: id.to_owned(),
        cert_pem: std::fs::read_to_string(creds.cert()).expect("cert"),
        key_pem: std::fs::read_to_string(creds.key()).expect("key"),
    };
    let config = endpoint.tls_config(&cred).expect("tls config");
    raw::connect(
        &endpoint,
        config,
        id,
        "127.0.0.1".parse().expect("ip"),
        keepalive_secs,
    )
    .await
    .expect("device connects")
}

/// A raw MQTT 3.1.1 connection on the dev listener; returns the stream after CONNACK.
async fn raw_dev(server: &Server, client_id: &str, keepalive_secs: u16) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(server.mqtt_dev)
        .await
        .expect("dev listener");
    let mut buf = Vec::new();
    raw::encode_connect(&mut buf, client_id, keepalive_secs);
    tcp.write_all(&buf).await.expect("connect");
    match read_packet(&mut tcp).await {
        Some(Packet::ConnAck { return_code: 0, .. }) => tcp,
        other => panic!("dev CONNACK: {other:?}"),
    }
}

/// Reads one packet (bounded by WAIT); None on EOF.
async fn read_packet(tcp: &mut tokio::net::TcpStream) -> Option<Packet> {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some((p, _)) = raw::decode(&buf).expect("decodable") {
            return Some(p);
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut chunk))
            .await
            .expect("packet or EOF in time")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until EOF (bounded by WAIT), discarding what arrives.
async fn wait_eof(tcp: &mut tokio::net::TcpStream) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.read(&mut chunk))
            .await
            .expect("server closes the connection in time")
            .unwrap_or(0);
        if n == 0 {
            return;
        }
    }
}

#[tokio::test]
async fn a_service_using_a_device_client_id_is_refused_and_the_device_keeps_its_commands() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d1 = server.create_device("d1", tmp.path());
    let token = service_token(&server, "reader");
    let mut device = MqttDevice::connect(&server, &d1, "d1").await;
    device.subscribe("devices/d1/commands/+").await;

    for (version, expect) in [
        ("mqttv5", "client identifier not valid"),
        ("mqttv311", "identifier rejected"),
    ] {
        let mut args = service_args(&server, &d1, &token, "d1");
        args.extend(s(&[
            "-V",
            version,
            "-q",
            "1",
            "-t",
            "devices/d1/commands/+",
            "-C",
            "1",
            "-W",
            "10",
        ]));
        let out = Command::new("mosquitto_sub")
            .args(&args)
            .output()
            .expect("mosquitto_sub");
        assert!(!out.status.success(), "{version}: service connected as d1");
        assert!(stderr(&out).contains(expect), "{version}: {}", stderr(&out));
    }

    // The device was never kicked and still receives its own commands.
    let (status, cmd) = server
        .api(
            "POST",
            "/api/v1/devices/d1/commands",
            Some(serde_json::json!({"name": "reboot"})),
        )
        .await;
    assert_eq!(status, 202, "{cmd}");
    let (topic, body) = device.next_json().await;
    assert_eq!(
        topic,
        format!("devices/d1/commands/{}", cmd["id"].as_str().expect("id"))
    );
    assert_eq!(body["name"], "reboot");
    assert_eq!(
        server
            .metric("mooring_mqtt_refusals_total{reason=\"client_id_invalid\"}")
            .await,
        2.0
    );

    // Between services too, a session belongs to the token that made it: another token using
    // the same client id is refused and does not kick it.
    let other = service_token(&server, "other");
    let mut args = service_args(&server, &d1, &token, "pipeline-1");
    args.extend(s(&["-V", "mqttv5", "-q", "1", "-v", "-t", "devices/+/x"]));
    let mut owner = Sub::start(&args);
    let mut args = service_args(&server, &d1, &other, "pipeline-1");
    args.extend(s(&[
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        "devices/#",
        "-W",
        "10",
    ]));
    let out = Command::new("mosquitto_sub")
        .args(&args)
        .output()
        .expect("mosquitto_sub");
    assert!(!out.status.success(), "second token took the session");
    assert!(
        stderr(&out).contains("client identifier not valid"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        server
            .metric("mooring_mqtt_refusals_total{reason=\"client_id_in_use\"}")
            .await,
        1.0
    );
    device.publish("devices/d1/x", "still-there").await;
    assert_eq!(owner.next_message(), "devices/d1/x still-there");
}

#[tokio::test]
async fn a_device_never_inherits_a_session_planted_on_the_dev_listener() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d1 = server.create_device("d1", tmp.path());
    let d2 = server.create_device("d2", tmp.path());

    // An anonymous dev-listener client plants a persistent session named d1 holding devices/#.
    let mut plant = dev_args(&server);
    plant.extend(s(&[
        "-V",
        "mqttv311",
        "-i",
        "d1",
        "-c",
        "-q",
        "1",
        "-t",
        "devices/#",
    ]));
    let mut planted = Sub::start(&plant);
    planted.kill9();

    // The real d1 connects with a persistent session of its own.
    let mut sub = device_subscriber(&server, &d1, "mqttv311", "d1", true, &["devices/d1/x"]);
    device_pub(
        &server,
        &d2,
        "d2",
        "devices/d2/telemetry",
        r#"{"secret": 42}"#,
    );
    dev_pub(&server, "devices/d1/x", "marker");
    // Had it inherited the planted session, d2's telemetry would arrive first.
    assert_eq!(sub.next_message(), "devices/d1/x marker");
}

#[tokio::test]
async fn changing_tags_revokes_live_and_persisted_subscriptions_and_publishes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_configured(
        tmp.path(),
        r#"
        [[policy.rules]]
        principal = "device"
        action = "both"
        filter = "sites/{tag:site}/#"
        "#,
    );
    let d1 = server.create_device("d1", tmp.path());
    let (status, v) = server
        .api(
            "PUT",
            "/api/v1/devices/d1/tags",
            Some(serde_json::json!({"site": "berlin"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // A persistent session holding the site's topics, live.
    let mut sub = device_subscriber(
        &server,
        &d1,
        "mqttv311",
        "d1",
        true,
        &["sites/berlin/#", "devices/d1/x"],
    );
    dev_pub(&server, "sites/berlin/door", "before");
    assert_eq!(sub.next_message(), "sites/berlin/door before");

    // The device moves to Paris: the live subscription goes at once.
    let (status, v) = server
        .api(
            "PUT",
            "/api/v1/devices/d1/tags",
            Some(serde_json::json!({"site": "paris"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    dev_pub(&server, "sites/berlin/door", "after");
    dev_pub(&server, "devices/d1/x", "m1");
    assert_eq!(sub.next_message(), "devices/d1/x m1");
    assert!(
        server
            .metric("mooring_mqtt_refusals_total{reason=\"subscription_revoked\"}")
            .await
            >= 1.0
    );

    // Offline, nothing for Berlin is queued for it, and the resumed session has no Berlin filter.
    sub.kill9();
    server
        .wait_for("/api/v1/devices/d1", |v| v["online"] == false)
        .await;
    dev_pub(&server, "sites/berlin/door", "while-offline");
    let mut sub = device_subscriber(&server, &d1, "mqttv311", "d1", true, &["devices/d1/y"]);
    dev_pub(&server, "sites/berlin/door", "resumed");
    dev_pub(&server, "devices/d1/x", "m2");
    assert_eq!(sub.next_message(), "devices/d1/x m2");
    drop(sub);
    server
        .wait_for("/api/v1/devices/d1", |v| v["online"] == false)
        .await;

    // A live connection's publishes are checked against the tags as they are now.
    let mut conn = raw_device(&server, &d1, "d1", 60).await;
    conn.queue_publish("sites/paris/door", b"open", 1, 1);
    conn.flush().await.expect("publish");
    assert_eq!(
        conn.read_packet().await.expect("read"),
        Some(Packet::PubAck { packet_id: 1 })
    );
    let (status, v) = server
        .api(
            "PUT",
            "/api/v1/devices/d1/tags",
            Some(serde_json::json!({"site": "rome"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    conn.queue_publish("sites/paris/door", b"open", 1, 2);
    conn.flush().await.expect("publish");
    // v3.1.1 cannot carry a refusal: a denied QoS 1 publish closes the connection.
    assert_eq!(conn.read_packet().await.ok().flatten(), None);
}

#[tokio::test]
async fn a_policy_reload_revokes_subscriptions_it_no_longer_allows() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg_path = tmp.path().join("mooring.toml");
    let server = start_configured(
        tmp.path(),
        r#"
        [[policy.rules]]
        principal = "device"
        action = "subscribe"
        filter = "broadcast/#"
        "#,
    );
    let d1 = server.create_device("d1", tmp.path());
    let mut sub = device_subscriber(
        &server,
        &d1,
        "mqttv5",
        "d1",
        false,
        &["broadcast/#", "devices/d1/x"],
    );
    dev_pub(&server, "broadcast/all", "one");
    assert_eq!(sub.next_message(), "broadcast/all one");

    std::fs::write(&cfg_path, "# no extra rules\n").expect("rewrite config");
    let hup = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    server.wait_log("SIGHUP: policy reloaded");
    dev_pub(&server, "broadcast/all", "two");
    dev_pub(&server, "devices/d1/x", "marker");
    assert_eq!(sub.next_message(), "devices/d1/x marker");

    // A broken file changes nothing (and says so).
    std::fs::write(&cfg_path, "[[policy.rules]]\nprincipal = \"nobody\"\n").expect("rewrite");
    Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("kill");
    server.wait_log("policy not reloaded");
}

#[tokio::test]
async fn deleting_a_device_removes_its_persisted_session_and_retained_messages() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d1 = server.create_device("d1", tmp.path());
    // A retained state message and a persistent session with a queued message.
    let mut args = d1.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-V",
        "mqttv5",
        "-i",
        "d1",
        "-q",
        "1",
        "-r",
        "-t",
        "devices/d1/state",
        "-m",
        "old-owner",
    ]));
    let out = mosquitto_pub(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut args = d1.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-V",
        "mqttv311",
        "-i",
        "d1",
        "-c",
        "-q",
        "1",
        "-t",
        "devices/d1/inbox",
    ]));
    let mut sub = Sub::start(&args);
    sub.kill9();
    server
        .wait_for("/api/v1/devices/d1", |v| v["online"] == false)
        .await;
    dev_pub(&server, "devices/d1/inbox", "for-the-old-owner");
    assert_eq!(server.metric("mooring_mqtt_retained_messages").await, 1.0);

    let out = server.cli(&["device", "delete", "d1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(server.metric("mooring_mqtt_retained_messages").await, 0.0);

    // A new device under the same id starts with nothing: no retained state, no session.
    let again = server.create_device("d1", &tmp.path().join("again"));
    let mut sub = device_subscriber(&server, &again, "mqttv311", "d1", true, &["devices/d1/#"]);
    dev_pub(&server, "devices/d1/marker", "fresh");
    assert_eq!(sub.next_message(), "devices/d1/marker fresh");
}

#[tokio::test]
async fn service_persistent_sessions_are_capped_per_token_and_devices_still_connect() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_configured(
        tmp.path(),
        "[limits]\nmqtt_persistent_sessions_per_service_max = 2\n",
    );
    let d1 = server.create_device("d1", tmp.path());
    let token = service_token(&server, "pipeline");
    for i in 0..2 {
        let mut args = service_args(&server, &d1, &token, &format!("pipe-{i}"));
        args.extend(s(&[
            "-V",
            "mqttv5",
            "-x",
            "3600",
            "-c",
            "-q",
            "1",
            "-t",
            "devices/#",
        ]));
        let mut sub = Sub::start(&args);
        sub.kill9();
    }
    for (version, expect) in [("mqttv5", "quota exceeded"), ("mqttv311", "unavailable")] {
        let mut args = service_args(&server, &d1, &token, "pipe-3");
        args.extend(s(&[
            "-V",
            version,
            "-x",
            "3600",
            "-c",
            "-q",
            "1",
            "-t",
            "devices/#",
            "-W",
            "10",
        ]));
        if version == "mqttv311" {
            // -x is v5 only; v3.1.1 asks for a persistent session with -c alone.
            args.retain(|a| a != "-x" && a != "3600");
        }
        let out = Command::new("mosquitto_sub")
            .args(&args)
            .output()
            .expect("mosquitto_sub");
        assert!(
            !out.status.success(),
            "{version}: third persistent session admitted"
        );
        assert!(stderr(&out).contains(expect), "{version}: {}", stderr(&out));
    }
    assert_eq!(
        server
            .metric("mooring_mqtt_refusals_total{reason=\"session_quota\"}")
            .await,
        2.0
    );
    // A clean session of the same service and every device are still admitted.
    let mut args = service_args(&server, &d1, &token, "pipe-live");
    args.extend(s(&["-V", "mqttv5", "-q", "1", "-t", "devices/#"]));
    let _live = Sub::start(&args);
    let mut device = MqttDevice::connect(&server, &d1, "d1").await;
    device.publish("devices/d1/x", "hello").await;
}

#[tokio::test]
async fn a_device_cannot_grow_its_metric_names_without_bound() {
    // Every distinct metric name is a series the store keeps for the device's lifetime (its last
    // known value outlives retention), so a device that invents names must hit a bound.
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_configured(tmp.path(), "[telemetry]\nmetrics_per_device_max = 3\n");
    let d1 = server.create_device("d1", tmp.path());
    let publish = |version: &str, seq: u32, payload: &str| {
        let mut args = d1.mosquitto_args(server.mqtt);
        let body = format!(r#"{{"seq": {seq}, {payload}}}"#);
        args.extend(s(&[
            "-V",
            version,
            "-i",
            "d1",
            "-q",
            "1",
            "-t",
            "devices/d1/telemetry",
            "-m",
            &body,
        ]));
        mosquitto_pub(&args)
    };
    let out = publish("mqttv5", 1, r#""a": 1, "b": 2, "c": 3"#);
    assert!(out.status.success(), "{}", stderr(&out));
    // A fourth name: v5 is told 0x97 and nothing of that message is stored.
    let out = publish("mqttv5", 2, r#""a": 10, "evil-1": 1"#);
    assert!(stderr(&out).contains("quota exceeded"), "{}", stderr(&out));
    // v3.1.1 cannot be told; the message is dropped all the same.
    let out = publish("mqttv311", 3, r#""evil-2": 1"#);
    assert!(out.status.success(), "{}", stderr(&out));
    // Names the device already has are still stored.
    let out = publish("mqttv5", 4, r#""a": 4, "c": 5"#);
    assert!(out.status.success(), "{}", stderr(&out));
    let latest = server
        .wait_for("/api/v1/devices/d1/telemetry/latest", |v| {
            v["metrics"]["a"]["value"] == 4.0
        })
        .await;
    let names: Vec<&String> = latest["metrics"]
        .as_object()
        .expect("metrics object")
        .keys()
        .collect();
    assert_eq!(names, ["a", "b", "c"], "{latest}");
    assert_eq!(
        server
            .metric("mooring_telemetry_metrics_limited_total")
            .await,
        2.0
    );
    // Another device has its own bound.
    let d2 = server.create_device("d2", tmp.path());
    let mut args = d2.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-V",
        "mqttv5",
        "-i",
        "d2",
        "-q",
        "1",
        "-t",
        "devices/d2/telemetry",
        "-m",
        r#"{"seq": 1, "evil-1": 1}"#,
    ]));
    let out = mosquitto_pub(&args);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test]
async fn retained_messages_are_capped_per_device_and_shadow_deltas_are_still_kept() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_configured(
        tmp.path(),
        "[limits]\nmqtt_retained_per_principal_max = 3\nmqtt_retained_bytes_per_principal_max = 4096\n",
    );
    let d1 = server.create_device("d1", tmp.path());
    let publish = |version: &str, topic: &str, payload: &str| {
        let mut args = d1.mosquitto_args(server.mqtt);
        args.extend(s(&[
            "-V", version, "-i", "d1", "-q", "1", "-r", "-t", topic, "-m", payload,
        ]));
        mosquitto_pub(&args)
    };
    for i in 0..3 {
        let out = publish("mqttv5", &format!("devices/d1/r{i}"), "kept");
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // Over the count, and (replacing r0) over the bytes: v5 is told 0x97 Quota exceeded.
    let big = "x".repeat(5000);
    for (topic, payload) in [
        ("devices/d1/r3", "one-too-many"),
        ("devices/d1/r0", big.as_str()),
    ] {
        let out = publish("mqttv5", topic, payload);
        assert!(
            stderr(&out).contains("quota exceeded"),
            "{topic}: {}",
            stderr(&out)
        );
    }
    // v3.1.1 cannot be told: the message is delivered but not retained.
    let out = publish("mqttv311", "devices/d1/r3", "not-retained");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(server.metric("mooring_mqtt_retained_messages").await, 3.0);
    assert_eq!(
        server
            .metric("mooring_mqtt_refusals_total{reason=\"retained_quota\"}")
            .await,
        3.0
    );

    // The server's own retained message (the shadow delta) is kept whatever the device did.
    let (status, v) = server
        .api(
            "PATCH",
            "/api/v1/devices/d1/shadow",
            Some(serde_json::json!({"desired": {"led": "on"}})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(server.metric("mooring_mqtt_retained_messages").await, 4.0);
    let mut sub = device_sub(&server, &d1, "d1", "devices/d1/shadow/delta");
    let (topic, delta) = sub.next_json();
    assert_eq!(topic, "devices/d1/shadow/delta");
    assert_eq!(delta["delta"]["led"], "on", "{delta}");
}

#[tokio::test]
async fn oversized_topic_filters_and_names_are_refused_before_they_are_stored() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let rss_before = server.rss_kib();
    let mut tcp = raw_dev(&server, "deep", 60).await;
    // 48 filters of 16,350 levels each (32,700 bytes): the attack that took RSS to ~486 MiB.
    let filter = "a/".repeat(16_349) + "a";
    for pid in 1..=48u16 {
        let mut buf = Vec::new();
        raw::encode_subscribe(&mut buf, pid, &filter, 0);
        tcp.write_all(&buf).await.expect("subscribe");
        match read_packet(&mut tcp).await {
            Some(Packet::SubAck {
                packet_id,
                return_code,
            }) => {
                assert_eq!(packet_id, pid);
                assert_eq!(return_code, 0x80, "filter over the level limit refused");
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
    assert_eq!(server.metric("mooring_mqtt_subscriptions").await, 0.0);
    assert_eq!(
        server
            .metric("mooring_mqtt_refusals_total{reason=\"topic_too_long\"}")
            .await,
        48.0
    );
    eprintln!(
        "server RSS before {rss_before} KiB, after 48 deep filters {} KiB",
        server.rss_kib()
    );
    // A topic name over the limit closes a v3.1.1 connection (QoS 0 has no way to say no).
    let mut buf = Vec::new();
    raw::encode_publish(&mut buf, &"b/".repeat(100), b"x", 0, 0);
    tcp.write_all(&buf).await.expect("publish");
    wait_eof(&mut tcp).await;
}

/// Floods `devices/<id>/flood` from the dev listener with QoS 0 messages.
async fn flood(server: &Server, id: &str, count: usize, size: usize) {
    let mut tcp = raw_dev(server, &format!("flood-{id}"), 60).await;
    let payload = vec![b'z'; size];
    let topic = format!("devices/{id}/flood");
    for _ in 0..count {
        let mut buf = Vec::new();
        raw::encode_publish(&mut buf, &topic, &payload, 0, 0);
        tcp.write_all(&buf).await.expect("flood");
    }
    let mut buf = Vec::new();
    buf.extend_from_slice(&[0xE0, 0x00]); // DISCONNECT
    tcp.write_all(&buf).await.expect("disconnect");
}

#[tokio::test]
async fn a_device_that_stops_reading_cannot_hold_a_takeover_a_deletion_or_memory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_configured(
        tmp.path(),
        "[limits]\nmqtt_write_stall_timeout_ms = 120000\n",
    );
    let d1 = server.create_device("d1", tmp.path());
    let d2 = server.create_device("d2", tmp.path());
    let rss_before = server.rss_kib();

    // d1 subscribes and then never reads; 40 MB of QoS 0 is published to it.
    let mut stuck = raw_device(&server, &d1, "d1", 0).await;
    stuck.subscribe("devices/d1/#", 0).await.expect("subscribe");
    flood(&server, "d1", 200, 200 * 1024).await;
    // The socket is full: QoS 0 is dropped under pressure (counted), not buffered without end.
    server
        .wait_metric("mooring_mqtt_refusals_total{reason=\"queue_full\"}", |v| {
            v > 0.0
        })
        .await;
    eprintln!(
        "server RSS before {rss_before} KiB, with a stuck reader and 40 MB published to it {} KiB",
        server.rss_kib()
    );

    // The same certificate connects again: the takeover completes although the old connection
    // is blocked in a write, and the old connection is closed (not left ESTABLISHED).
    let again = raw_device(&server, &d1, "d1", 0).await;
    server
        .wait_metric("mooring_mqtt_connections", |v| v == 1.0)
        .await;
    drop(again);
    drop(stuck);
    server
        .wait_metric("mooring_mqtt_connections", |v| v == 0.0)
        .await;

    // Deleting a device whose connection is blocked in a write closes it.
    let mut stuck = raw_device(&server, &d2, "d2", 0).await;
    stuck.subscribe("devices/d2/#", 0).await.expect("subscribe");
    flood(&server, "d2", 200, 200 * 1024).await;
    server
        .wait_metric("mooring_mqtt_refusals_total{reason=\"queue_full\"}", |v| {
            v > 0.0
        })
        .await;
    let out = server.cli(&["device", "delete", "d2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    server
        .wait_metric("mooring_mqtt_connections", |v| v == 0.0)
        .await;
    drop(stuck);
}

#[tokio::test]
async fn a_connection_whose_peer_stopped_reading_is_closed_after_the_write_timeout() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_configured(tmp.path(), "[limits]\nmqtt_write_stall_timeout_ms = 300\n");
    let d1 = server.create_device("d1", tmp.path());
    let mut stuck = raw_device(&server, &d1, "d1", 0).await;
    stuck.subscribe("devices/d1/#", 0).await.expect("subscribe");
    flood(&server, "d1", 200, 200 * 1024).await;
    server
        .wait_metric(
            "mooring_mqtt_refusals_total{reason=\"write_stalled\"}",
            |v| v == 1.0,
        )
        .await;
    server
        .wait_metric("mooring_mqtt_connections", |v| v == 0.0)
        .await;
    server
        .wait_for("/api/v1/devices/d1", |v| v["online"] == false)
        .await;
    drop(stuck);
}

#[tokio::test]
async fn keepalive_zero_is_supervised_with_the_server_maximum() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start_configured(tmp.path(), "[limits]\nmqtt_keepalive_secs_max = 1\n");
    // v3.1.1, keepalive 0, then silence: closed after 1.5 × mqtt_keepalive_secs_max.
    let mut tcp = raw_dev(&server, "silent", 0).await;
    wait_eof(&mut tcp).await;
    // A v3.1.1 keepalive above the maximum is capped the same way.
    let mut tcp = raw_dev(&server, "sleepy", 3600).await;
    wait_eof(&mut tcp).await;
    assert_eq!(
        server
            .metric("mooring_mqtt_refusals_total{reason=\"keepalive_timeout\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn a_v311_device_with_200_qos1_messages_in_flight_gets_every_puback() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d1 = server.create_device("d1", tmp.path());
    let mut conn = raw_device(&server, &d1, "d1", 60).await;
    // More in flight than the server processes at once (32): it stops reading, never closes.
    for id in 1..=200u16 {
        let payload = format!(r#"{{"seq":{id},"n":{id}}}"#);
        conn.queue_publish("devices/d1/telemetry", payload.as_bytes(), 1, id);
    }
    conn.flush().await.expect("publish");
    let mut acked = std::collections::BTreeSet::new();
    while acked.len() < 200 {
        match conn.read_packet().await.expect("read") {
            Some(Packet::PubAck { packet_id }) => {
                acked.insert(packet_id);
            }
            Some(_) => {}
            None => panic!("closed after {} PUBACKs", acked.len()),
        }
    }
    let (_, v) = server
        .api(
            "GET",
            "/api/v1/devices/d1/telemetry?metric=n&limit=1000",
            None,
        )
        .await;
    assert_eq!(v["points"].as_array().map(Vec::len), Some(200), "{v}");
}

#[tokio::test]
async fn a_store_that_cannot_write_is_answered_per_message_and_logged_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d1 = server.create_device("d1", tmp.path());
    // Another process holds the database's write lock: every batch fails (busy, after 5 s).
    let db = rusqlite::Connection::open(server.data_dir.join("mooring.db")).expect("open db");
    db.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    let mut args = d1.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-V",
        "mqttv5",
        "-i",
        "d1",
        "-q",
        "1",
        "-t",
        "devices/d1/telemetry",
        "-l",
    ]));
    // Three messages on one connection (-l: one per stdin line): each is answered 0x97 and the
    // session stays up for the next one, instead of a DISCONNECT of the whole session.
    let mut publisher = Command::new("mosquitto_pub")
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    {
        use std::io::Write;
        let mut stdin = publisher.stdin.take().expect("stdin");
        for seq in 1..=3 {
            writeln!(stdin, r#"{{"seq":{seq},"n":{seq}}}"#).expect("line");
        }
    }
    let out = publisher.wait_with_output().expect("mosquitto_pub");
    db.execute_batch("ROLLBACK").expect("unlock");
    let err = stderr(&out);
    assert_eq!(err.matches("quota exceeded").count(), 3, "{err}");
    assert!(!err.contains("disconnect"), "{err}");
    // Nothing unstored was acknowledged, and the log said so once, with the count.
    server.wait_log("telemetry not stored and not acknowledged");
    let log = server.log_text();
    assert_eq!(
        log.matches("telemetry not stored and not acknowledged")
            .count(),
        1,
        "{log}"
    );
    // Ingest resumes by itself once the store takes writes again.
    device_pub(
        &server,
        &d1,
        "d1",
        "devices/d1/telemetry",
        r#"{"seq":4,"n":4}"#,
    );
    let (_, v) = server
        .api("GET", "/api/v1/devices/d1/telemetry?metric=n", None)
        .await;
    assert_eq!(v["points"].as_array().map(Vec::len), Some(1), "{v}");
}

#[tokio::test]
async fn two_service_workers_split_device_telemetry_and_a_device_may_not_share_another_devices() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d1 = server.create_device("d1", tmp.path());
    let token = service_token(&server, "workers");
    let filter = "$share/workers/devices/+/telemetry";
    let mut workers: Vec<Sub> = ["worker-1", "worker-2"]
        .iter()
        .map(|id| {
            let mut args = service_args(&server, &d1, &token, id);
            args.extend(s(&["-V", "mqttv5", "-q", "1", "-v", "-t", filter]));
            Sub::start(&args)
        })
        .collect();
    // Another token's group of the same name is its own group: it gets every message.
    let other = service_token(&server, "audit");
    let mut args = service_args(&server, &d1, &other, "audit-1");
    args.extend(s(&["-V", "mqttv311", "-q", "1", "-v", "-t", filter]));
    let mut audit = Sub::start(&args);

    let mut device = MqttDevice::connect(&server, &d1, "d1").await;
    let sent: Vec<String> = (1..=4)
        .map(|i| format!(r#"{{"seq":{i},"v":{i}}}"#))
        .collect();
    for payload in &sent {
        device.publish("devices/d1/telemetry", payload).await;
    }
    let mut got = Vec::new();
    for w in &mut workers {
        for _ in 0..2 {
            let line = w.next_message();
            let payload = line
                .strip_prefix("devices/d1/telemetry ")
                .unwrap_or_else(|| panic!("unexpected line {line}"));
            got.push(payload.to_owned());
        }
    }
    got.sort();
    assert_eq!(got, sent, "each message reached exactly one worker");
    for payload in &sent {
        assert_eq!(
            audit.next_message(),
            format!("devices/d1/telemetry {payload}")
        );
    }
    assert_eq!(server.metric("mooring_mqtt_shared_groups").await, 2.0);
    drop(device);

    // A device may share only within its own subtree.
    for (version, code) in [("mqttv311", "128"), ("mqttv5", "135")] {
        let mut args = d1.mosquitto_args(server.mqtt);
        args.extend(s(&[
            "-V",
            version,
            "-i",
            "d1",
            "-t",
            "$share/g/devices/other/#",
            "-C",
            "1",
            "-W",
            "10",
            "-d",
        ]));
        let out = Command::new("mosquitto_sub")
            .args(&args)
            .output()
            .expect("mosquitto_sub");
        let text = stderr(&out);
        assert!(
            text.contains(&format!("subscribed (mid: 1): {code}")),
            "{version}: {text}"
        );
    }
}
