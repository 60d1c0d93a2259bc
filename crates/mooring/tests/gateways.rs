//! Gateways (issue 20, docs/edge.md): a gateway device relays for its attached children on the
//! children's own topics, and nothing more. The real server; the gateway is a raw MQTT client
//! (rumqttc), the impostor mosquitto_pub/sub.

mod support;

use serde_json::{json, Value};
use support::{mosquitto_pub, s, MqttDevice, Server};

fn cli_ok(server: &Server, args: &[&str]) -> String {
    let out = server.cli(args);
    assert!(
        out.status.success(),
        "mooring {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `mooring ...` that must fail; its stderr.
fn cli_err(server: &Server, args: &[&str]) -> String {
    let out = server.cli(args);
    assert!(!out.status.success(), "mooring {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn points(v: &Value) -> usize {
    v["points"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_relays_for_its_attached_children_only() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let gw1 = server.create_device("gw-1", tmp.path());
    let gw2 = server.create_device("gw-2", tmp.path());
    server.create_device("lock-1", tmp.path());
    server.create_device("lock-2", tmp.path());

    // Attach, and what cannot be attached.
    let out = cli_ok(
        &server,
        &["device", "attach", "lock-1", "--gateway", "gw-1"],
    );
    assert!(out.contains("attached lock-1 to gateway gw-1"), "{out}");
    let (status, a) = server
        .api("GET", "/api/v1/devices/lock-1/gateway", None)
        .await;
    assert_eq!((status, a["gateway"].as_str()), (200, Some("gw-1")), "{a}");
    assert!(cli_err(
        &server,
        &["device", "attach", "lock-2", "--gateway", "lock-2"]
    )
    .contains("own gateway"));
    // No chains: a child cannot be a gateway, a gateway cannot be a child.
    let (status, e) = server
        .api(
            "PUT",
            "/api/v1/devices/lock-2/gateway",
            Some(json!({"gateway": "lock-1"})),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_gateway")),
        "{e}"
    );
    let (status, e) = server
        .api(
            "PUT",
            "/api/v1/devices/gw-1/gateway",
            Some(json!({"gateway": "gw-2"})),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("invalid_gateway")),
        "{e}"
    );
    let (status, e) = server
        .api(
            "PUT",
            "/api/v1/devices/lock-2/gateway",
            Some(json!({"gateway": "nope"})),
        )
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("device_not_found")),
        "{e}"
    );
    let (status, e) = server
        .api(
            "PUT",
            "/api/v1/devices/lock-2/gateway",
            Some(json!({"gw": "gw-1"})),
        )
        .await;
    assert_eq!(status, 400, "{e}");

    // The gateway speaks for lock-1: presence, telemetry, a command and its result.
    let mut gw = MqttDevice::connect(&server, &gw1, "gw-1").await;
    gw.subscribe("devices/lock-1/commands/+").await;
    gw.publish("devices/lock-1/presence", r#"{"v":1,"online":true}"#)
        .await;
    server
        .wait_for("/api/v1/devices/lock-1", |v| v["online"] == true)
        .await;
    gw.publish("devices/lock-1/telemetry", r#"{"seq":1,"temp":21.5}"#)
        .await;
    // The same seq again is a duplicate: stored once.
    gw.publish("devices/lock-1/telemetry", r#"{"seq":1,"temp":21.5}"#)
        .await;
    let (_, t) = server
        .api("GET", "/api/v1/devices/lock-1/telemetry", None)
        .await;
    assert_eq!(points(&t), 1, "{t}");
    let (status, c) = server
        .api(
            "POST",
            "/api/v1/devices/lock-1/commands",
            Some(json!({"name": "unlock", "params": {"door": 2}})),
        )
        .await;
    assert!(status == 200 || status == 202, "{c}");
    let cmd = c["id"].as_str().expect("command id").to_owned();
    let (topic, req) = gw.next_json().await;
    assert_eq!(topic, format!("devices/lock-1/commands/{cmd}"));
    assert_eq!(req["name"], "unlock");
    gw.publish(
        &format!("devices/lock-1/commands/{cmd}/result"),
        r#"{"status":"succeeded","output":{"opened":true}}"#,
    )
    .await;
    server
        .wait_for(&format!("/api/v1/devices/lock-1/commands/{cmd}"), |v| {
            v["state"] == "succeeded"
        })
        .await;
    // A child's certificate renewal is never the gateway's to ask (v3.1.1: the connection
    // closes, checked last below); a bad presence payload is refused.
    let children = server.cli_json(&["device", "children", "gw-1", "-o", "json"]);
    assert_eq!(children[0]["id"], "lock-1", "{children}");
    assert_eq!(children[0]["online"], true, "{children}");

    // Another gateway cannot impersonate gw-1's child: its publish is refused (v5 0x87) and
    // stores nothing, its subscription is refused (SUBACK 0x87).
    let mut args = gw2.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-i",
        "gw-2",
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        "devices/lock-1/telemetry",
        "-m",
        r#"{"seq":2,"temp":99}"#,
    ]));
    let out = mosquitto_pub(&args);
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("not authorized"), "{err}");
    let mut args = gw2.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-i",
        "gw-2",
        "-V",
        "mqttv5",
        "-t",
        "devices/lock-1/commands/+",
        "-C",
        "1",
        "-W",
        "5",
        "-d",
    ]));
    let out = std::process::Command::new("mosquitto_sub")
        .args(&args)
        .output()
        .expect("mosquitto_sub");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Subscribed (mid: 1): 135"), "{text}");
    let (_, t) = server
        .api("GET", "/api/v1/devices/lock-1/telemetry", None)
        .await;
    assert_eq!(points(&t), 1, "{t}");

    // Even for its own child a gateway may send only what the child would send the server:
    // never a command or a shadow delta for it, and nothing retained.
    cli_ok(
        &server,
        &["device", "attach", "lock-2", "--gateway", "gw-2"],
    );
    for (topic, retain) in [
        ("devices/lock-2/commands/forged", false),
        ("devices/lock-2/shadow/delta", false),
        ("devices/lock-2/telemetry", true),
    ] {
        let mut args = gw2.mosquitto_args(server.mqtt);
        args.extend(s(&[
            "-i",
            "gw-2",
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            r#"{"seq":5,"x":1}"#,
        ]));
        if retain {
            args.push("-r".into());
        }
        let out = mosquitto_pub(&args);
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(err.contains("not authorized"), "{topic}: {err}");
    }
    let (_, t) = server
        .api("GET", "/api/v1/devices/lock-2/telemetry", None)
        .await;
    assert_eq!(points(&t), 0, "{t}");

    // Detached: at once the gateway may no longer act for it, and the child is offline.
    cli_ok(&server, &["device", "detach", "lock-1"]);
    server
        .wait_for("/api/v1/devices/lock-1", |v| v["online"] == false)
        .await;
    let (status, e) = server
        .api("GET", "/api/v1/devices/lock-1/gateway", None)
        .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("not_attached")),
        "{e}"
    );
    assert!(cli_err(&server, &["device", "detach", "lock-1"]).contains("not attached"));
    // Its subscription for the child was removed: a new command is not delivered to it.
    let (_, c) = server
        .api(
            "POST",
            "/api/v1/devices/lock-1/commands",
            Some(json!({"name": "unlock", "params": {}})),
        )
        .await;
    let second = c["id"].as_str().expect("command id").to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (_, c) = server
        .api(
            "GET",
            &format!("/api/v1/devices/lock-1/commands/{second}"),
            None,
        )
        .await;
    assert_eq!(c["state"], "queued", "{c}");
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("subscription_revoked"),
        "a revoked subscription is counted"
    );
    // And a publish for it now closes the gateway's (v3.1.1) connection, storing nothing.
    let mut gw = gw;
    gw.publish_no_wait("devices/lock-1/telemetry", r#"{"seq":3,"temp":1}"#)
        .await;
    gw.closed().await;
    let (_, t) = server
        .api("GET", "/api/v1/devices/lock-1/telemetry", None)
        .await;
    assert_eq!(points(&t), 1, "{t}");
}

/// The real thing end to end: `mooring-agent --gateway-socket` holds one connection for the
/// reference child `mooring-agent child`, which speaks the line protocol over a Unix socket.
/// The child's telemetry is stored under the child, a command to the child reaches it through
/// the gateway and its result comes back, and the child goes offline when it leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_relays_for_a_reference_child_over_a_unix_socket() {
    use std::io::Write as _;
    use std::process::Stdio;
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let gw = server.create_device("gw-9", tmp.path());
    server.create_device("meter-3", tmp.path());
    cli_ok(
        &server,
        &["device", "attach", "meter-3", "--gateway", "gw-9"],
    );
    let socket = tmp.path().join("gw.sock");
    let _agent = Killed(
        support::agent_command(&server, &gw, &tmp.path().join("gw-state"))
            .arg("--gateway-socket")
            .arg(&socket)
            .args(["--interval-secs", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mooring-agent"),
    );
    server
        .wait_for("/api/v1/devices/gw-9", |v| v["online"] == true)
        .await;
    let agent_bin = std::path::Path::new(support::BIN).with_file_name("mooring-agent");
    let mut child = Killed(
        std::process::Command::new(agent_bin)
            .args(["child", "--socket"])
            .arg(&socket)
            .args(["--id", "meter-3"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mooring-agent child"),
    );
    server
        .wait_for("/api/v1/devices/meter-3", |v| v["online"] == true)
        .await;
    let mut stdin = child.0.stdin.take().expect("stdin");
    writeln!(stdin, r#"{{"kwh": 1234.5, "seq": 7}}"#).expect("write");
    writeln!(stdin, r#"{{"kwh": 1234.5, "seq": 7}}"#).expect("write"); // a repeat: stored once
    writeln!(stdin, r#"{{"kwh": 1240.0, "seq": 8}}"#).expect("write");
    stdin.flush().expect("flush");
    let t = server
        .wait_for("/api/v1/devices/meter-3/telemetry", |v| points(v) >= 2)
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (_, t2) = server
        .api("GET", "/api/v1/devices/meter-3/telemetry", None)
        .await;
    assert_eq!(points(&t2), 2, "{t}");
    let (status, c) = server
        .api(
            "POST",
            "/api/v1/devices/meter-3/commands",
            Some(json!({"name": "read-register", "params": {"register": 40001}})),
        )
        .await;
    assert!(status == 200 || status == 202, "{c}");
    let cmd = c["id"].as_str().expect("command id").to_owned();
    let done = server
        .wait_for(&format!("/api/v1/devices/meter-3/commands/{cmd}"), |v| {
            v["state"] == "succeeded"
        })
        .await;
    assert_eq!(
        done["result"]["output"]["echo"],
        json!({"register": 40001}),
        "{done}"
    );
    // The child leaves: offline; the gateway stays.
    drop(stdin);
    drop(child);
    server
        .wait_for("/api/v1/devices/meter-3", |v| v["online"] == false)
        .await;
    let (_, g) = server.api("GET", "/api/v1/devices/gw-9", None).await;
    assert_eq!(g["online"], true, "{g}");
}

/// A process killed (and reaped) when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deleting a child ends its gateway's subscriptions for it: a device created again with the
/// same id starts with nothing, and what it publishes does not reach the old gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_child_leaves_nothing_to_its_old_gateway() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let gw = server.create_device("gw-5", tmp.path());
    server.create_device("pump-1", tmp.path());
    cli_ok(
        &server,
        &["device", "attach", "pump-1", "--gateway", "gw-5"],
    );
    let mut g = MqttDevice::connect(&server, &gw, "gw-5").await;
    g.subscribe("devices/pump-1/#").await;
    g.publish("devices/pump-1/presence", r#"{"v":1,"online":true}"#)
        .await;
    let (topic, _) = g.next_raw().await; // its own presence, through its subscription
    assert_eq!(topic, "devices/pump-1/presence");
    server
        .wait_for("/api/v1/devices/pump-1", |v| v["online"] == true)
        .await;
    cli_ok(&server, &["device", "delete", "pump-1"]);
    let again = tmp.path().join("again");
    std::fs::create_dir_all(&again).expect("dir");
    let creds = server.create_device("pump-1", &again);
    let (_, d) = server.api("GET", "/api/v1/devices/pump-1", None).await;
    assert_eq!(d["online"], false, "{d}");
    let (status, _) = server
        .api("GET", "/api/v1/devices/pump-1/gateway", None)
        .await;
    assert_eq!(status, 404);
    // The new pump-1 speaks for itself; the old gateway hears none of it.
    let mut p = MqttDevice::connect(&server, &creds, "pump-1").await;
    p.publish("devices/pump-1/telemetry", r#"{"seq":1,"flow":3}"#)
        .await;
    let heard = tokio::time::timeout(std::time::Duration::from_millis(1500), g.next_raw()).await;
    assert!(heard.is_err(), "the old gateway received {heard:?}");
    assert!(
        server.metrics_text().await.contains("subscription_revoked"),
        "the revocation is counted"
    );
}
