//! Behavioural tests of the foundation slice: the real `mooring` binary, driven by the real
//! CLI, mosquitto_pub/mosquitto_sub (MQTT 3.1.1 and 5) and HTTP.

mod support;

use serde_json::{json, Value};
use support::{mosquitto_pub, s, Server, Sub};

fn points(v: &Value) -> usize {
    v["points"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn device_lifecycle_through_cli_and_api() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));

    // First start wrote the CA, server cert and an admin token, secrets 0600.
    use std::os::unix::fs::PermissionsExt;
    for f in ["ca.key", "server.key", "admin.token"] {
        let mode = std::fs::metadata(server.data_dir.join(f))
            .expect(f)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    let creds = server.create_device("lock-1", tmp.path());
    let key_mode = std::fs::metadata(creds.key())
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert!(std::fs::read_to_string(creds.cert())
        .expect("crt")
        .contains("BEGIN CERTIFICATE"));
    assert!(std::fs::read_to_string(creds.ca())
        .expect("ca")
        .contains("BEGIN CERTIFICATE"));

    // Duplicate: 409 from the API, non-zero exit from the CLI.
    let (status, body) = server
        .api("POST", "/api/v1/devices", Some(json!({"id": "lock-1"})))
        .await;
    assert_eq!(status, 409);
    assert!(body["error"]["code"].is_string() && body["error"]["message"].is_string());
    let out = server.cli(&[
        "device",
        "create",
        "lock-1",
        "--out",
        tmp.path().join("again").to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(1));

    // Invalid ids: exit code 2 from the CLI, 400 from the API.
    for bad in ["_lock", "a/b", "x#", &"x".repeat(65)] {
        let out = server.cli(&["device", "create", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("invalid device id"));
    }
    let (status, body) = server
        .api("POST", "/api/v1/devices", Some(json!({"id": "bad id"})))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_device_id");
    let (status, _) = server
        .api("POST", "/api/v1/devices", Some(json!({"nope": 1})))
        .await;
    assert_eq!(status, 400);
    let (status, body) = server.api("PUT", "/api/v1/devices", None).await;
    assert_eq!(status, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed");
    let (status, body) = server.api("GET", "/api/v1/devices?limit=abc", None).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_query");

    // List (paginated), show, delete.
    server.create_device("lock-2", tmp.path());
    let (status, page) = server.api("GET", "/api/v1/devices?limit=1", None).await;
    assert_eq!(status, 200);
    assert_eq!(page["devices"].as_array().map(Vec::len), Some(1));
    let cursor = page["next_cursor"].as_str().expect("cursor").to_owned();
    let (_, page2) = server
        .api(
            "GET",
            &format!("/api/v1/devices?limit=1&cursor={cursor}"),
            None,
        )
        .await;
    assert_eq!(page2["devices"][0]["id"], "lock-2");
    let list = server.cli(&["device", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("lock-1") && text.contains("lock-2"), "{text}");
    let show = server.cli(&["device", "show", "lock-1", "--output", "json"]);
    let shown: Value = serde_json::from_slice(&show.stdout).expect("json");
    assert_eq!(shown["id"], "lock-1");
    assert_eq!(shown["online"], false);
    assert!(shown["created_at"].as_u64().is_some());
    assert!(shown.get("last_seen").is_some());
    let del = server.cli(&["device", "delete", "lock-2"]);
    assert!(del.status.success());
    let (status, body) = server.api("GET", "/api/v1/devices/lock-2", None).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "device_not_found");
    let del = server.cli(&["device", "delete", "lock-2"]);
    assert_eq!(del.status.code(), Some(1));

    // Auth: 401 with a JSON error without a token; health and OpenAPI are public.
    let resp = support::get(format!("{}/api/v1/devices", server.url())).await;
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "unauthorized");
    let health = support::get(format!("{}/healthz", server.url())).await;
    assert_eq!(health.status().as_u16(), 200);
    let spec: Value = support::get(format!("{}/api/v1/openapi.json", server.url()))
        .await
        .json()
        .await
        .expect("json");
    assert!(
        spec["paths"]["/api/v1/devices/{id}/telemetry"].is_object(),
        "{spec}"
    );

    // A second start reuses CA, server cert and token.
    let ca_before = std::fs::read(server.data_dir.join("ca.crt")).expect("ca");
    let token_before = server.token.clone();
    let dir = server.data_dir.clone();
    server.stop();
    let server = Server::start(&dir);
    assert_eq!(std::fs::read(dir.join("ca.crt")).expect("ca"), ca_before);
    assert_eq!(server.token, token_before);
    let (status, _) = server.api("GET", "/api/v1/devices/lock-1", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn telemetry_from_mosquitto_pub_v311_and_v5_is_stored_and_queryable() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d = server.create_device("sensor-1", tmp.path());
    for (version, temp) in [("mqttv311", 21.5), ("mqttv5", 22.5)] {
        let mut args = d.mosquitto_args(server.mqtt);
        args.extend(s(&[
            "-V",
            version,
            "-q",
            "1",
            "-t",
            "devices/sensor-1/telemetry",
        ]));
        args.extend([
            "-m".to_string(),
            json!({"temp": temp, "door": {"open": true}}).to_string(),
        ]);
        let out = mosquitto_pub(&args);
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (status, v) = server
        .api(
            "GET",
            "/api/v1/devices/sensor-1/telemetry?metric=temp",
            None,
        )
        .await;
    assert_eq!(status, 200);
    let values: Vec<f64> = v["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["value"].as_f64().expect("number"))
        .collect();
    assert_eq!(values, vec![21.5, 22.5]);
    let (_, latest) = server
        .api("GET", "/api/v1/devices/sensor-1/telemetry/latest", None)
        .await;
    assert_eq!(latest["metrics"]["temp"]["value"], 22.5);
    assert_eq!(latest["metrics"]["door.open"]["value"], true);
    assert!(latest["metrics"]["temp"]["ts"].as_u64().is_some());

    // Explicit ts and the time-range filter.
    let mut args = d.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-q",
        "1",
        "-t",
        "devices/sensor-1/telemetry",
        "-m",
        r#"{"ts":1000,"temp":5}"#,
    ]));
    assert!(mosquitto_pub(&args).status.success());
    let (_, v) = server
        .api(
            "GET",
            "/api/v1/devices/sensor-1/telemetry?metric=temp&from=0&to=2000",
            None,
        )
        .await;
    assert_eq!(v["points"], json!([{"ts": 1000, "value": 5.0}]));

    // The device shows as seen.
    let shown = server
        .wait_for("/api/v1/devices/sensor-1", |v| {
            v["last_seen"].as_u64().is_some()
        })
        .await;
    assert_eq!(shown["id"], "sensor-1");
}

#[tokio::test]
async fn repeated_seq_is_stored_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d = server.create_device("d1", tmp.path());
    for _ in 0..3 {
        let mut args = d.mosquitto_args(server.mqtt);
        args.extend(s(&[
            "-q",
            "1",
            "-t",
            "devices/d1/telemetry",
            "-m",
            r#"{"seq":42,"v":1}"#,
        ]));
        assert!(mosquitto_pub(&args).status.success());
    }
    let (_, v) = server
        .api("GET", "/api/v1/devices/d1/telemetry?metric=v", None)
        .await;
    assert_eq!(points(&v), 1, "{v}");
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("mooring_telemetry_duplicates_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn invalid_payload_is_dropped_counted_and_session_survives() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d = server.create_device("d1", tmp.path());
    for version in ["mqttv311", "mqttv5"] {
        // One connection, two messages: garbage first, then a valid point.
        let mut args = d.mosquitto_args(server.mqtt);
        args.extend(s(&[
            "-V",
            version,
            "-q",
            "1",
            "-t",
            "devices/d1/telemetry",
            "-l",
        ]));
        let mut child = std::process::Command::new("mosquitto_pub")
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("mosquitto_pub");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            writeln!(stdin, "this is not json").expect("write");
            writeln!(stdin, "{{\"ok\":1}}").expect("write");
        }
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if version == "mqttv5" {
            assert!(
                err.to_lowercase().contains("payload format invalid"),
                "{err}"
            );
        }
    }
    let (_, v) = server
        .api("GET", "/api/v1/devices/d1/telemetry?metric=ok", None)
        .await;
    assert_eq!(
        points(&v),
        2,
        "both sessions stayed up for the valid message: {v}"
    );
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("mooring_telemetry_invalid_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn topic_policy_denials() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d1 = server.create_device("d1", tmp.path());
    server.create_device("d2", tmp.path());

    // v3.1.1: a denied publish closes the connection; nothing is stored.
    let mut args = d1.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-V",
        "mqttv311",
        "-q",
        "1",
        "-t",
        "devices/d2/telemetry",
        "-m",
        r#"{"x":1}"#,
    ]));
    let out = mosquitto_pub(&args);
    assert!(!out.status.success(), "v3 denied publish must fail");
    // v5 QoS1: PUBACK with 0x87 (not authorized).
    let mut args = d1.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        "devices/d2/telemetry",
        "-m",
        r#"{"x":1}"#,
    ]));
    let out = mosquitto_pub(&args);
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("not authorized"), "{err}");
    let (_, v) = server
        .api("GET", "/api/v1/devices/d2/telemetry", None)
        .await;
    assert_eq!(points(&v), 0);

    // Denied subscribe: the SUBACK carries a failure (0x80 = 128 in 3.1.1, 0x87 = 135 in 5).
    for (version, code) in [("mqttv311", "128"), ("mqttv5", "135")] {
        let mut args = d1.mosquitto_args(server.mqtt);
        args.extend(s(&[
            "-V",
            version,
            "-t",
            "devices/d2/#",
            "-C",
            "1",
            "-W",
            "10",
            "-d",
        ]));
        let out = std::process::Command::new("mosquitto_sub")
            .args(&args)
            .output()
            .expect("sub");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains(&format!("Subscribed (mid: 1): {code}")),
            "{version}: {text}"
        );
        assert!(
            text.contains("All subscription requests were denied"),
            "{version}: {text}"
        );
    }

    // A device receives what is published to its own subtree (here from the dev listener).
    let mut own = d1.mosquitto_args(server.mqtt);
    own.extend(s(&["-V", "mqttv5", "-t", "devices/d1/#"]));
    let mut sub = Sub::start(&own);
    let dev = s(&[
        "-h",
        "127.0.0.1",
        "-p",
        &server.mqtt_dev.port().to_string(),
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        "devices/d1/hello",
        "-m",
        "hi",
    ]);
    assert!(mosquitto_pub(&dev).status.success());
    assert_eq!(sub.next_message(), "hi");
}

#[tokio::test]
async fn foreign_missing_and_deleted_certificates_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let other = Server::start(&tmp.path().join("other-data"));
    let foreign = other.create_device("d1", &tmp.path().join("foreign"));
    let d1 = server.create_device("d1", tmp.path());

    // A certificate from another fleet CA: the TLS handshake fails.
    let mut args = foreign.mosquitto_args(server.mqtt);
    args[5] = d1.ca().display().to_string(); // trust our server, present the foreign cert
    args.extend(s(&[
        "-q",
        "1",
        "-t",
        "devices/d1/telemetry",
        "-m",
        r#"{"x":1}"#,
    ]));
    assert!(!mosquitto_pub(&args).status.success());

    // No certificate at all: CONNECT refused.
    let args = s(&[
        "-h",
        "127.0.0.1",
        "-p",
        &server.mqtt.port().to_string(),
        "--cafile",
        d1.ca().to_str().expect("utf8"),
        "-q",
        "1",
        "-t",
        "devices/d1/telemetry",
        "-m",
        r#"{"x":1}"#,
    ]);
    assert!(!mosquitto_pub(&args).status.success());

    // A client id other than the device id: refused.
    let mut args = d1.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-i",
        "someone-else",
        "-q",
        "1",
        "-t",
        "devices/d1/telemetry",
        "-m",
        r#"{"x":1}"#,
    ]));
    assert!(!mosquitto_pub(&args).status.success());

    // A live session is closed when the device is deleted, and its certificate refused after.
    let mut sub_args = d1.mosquitto_args(server.mqtt);
    sub_args.extend(s(&["-V", "mqttv5", "-t", "devices/d1/#"]));
    let mut sub = Sub::start(&sub_args);
    server
        .wait_for("/api/v1/devices/d1", |v| v["online"] == true)
        .await;
    let (status, _) = server.api("DELETE", "/api/v1/devices/d1", None).await;
    assert_eq!(status, 204);
    // MQTT 5 clients are told why: DISCONNECT 0x98 (administrative action).
    sub.wait_line(|l| l.contains("DISCONNECT (152)"));
    sub.wait_exit();
    let (status, _) = server.api("GET", "/api/v1/devices/d1", None).await;
    assert_eq!(status, 404);
    let mut args = d1.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-q",
        "1",
        "-t",
        "devices/d1/telemetry",
        "-m",
        r#"{"x":1}"#,
    ]));
    assert!(!mosquitto_pub(&args).status.success());

    // Re-created with the same id: the old certificate stays refused, the new one works.
    let new = server.create_device("d1", &tmp.path().join("new"));
    assert!(!mosquitto_pub(&args).status.success());
    let mut args = new.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-q",
        "1",
        "-t",
        "devices/d1/telemetry",
        "-m",
        r#"{"x":1}"#,
    ]));
    assert!(mosquitto_pub(&args).status.success());
    let (_, v) = server
        .api("GET", "/api/v1/devices/d1/telemetry", None)
        .await;
    assert_eq!(points(&v), 1);
}

#[tokio::test]
async fn will_message_reaches_a_service_on_abnormal_disconnect() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d1 = server.create_device("d1", tmp.path());
    let token = server.cli(&["token", "create", "pipeline", "--role", "service"]);
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8_lossy(&token.stdout).trim().to_owned();

    // The service logs in with its token over TLS and watches every device's status.
    let svc_args = s(&[
        "-h",
        "127.0.0.1",
        "-p",
        &server.mqtt.port().to_string(),
        "--cafile",
        d1.ca().to_str().expect("utf8"),
        "-u",
        "pipeline",
        "-P",
        &token,
        "-V",
        "mqttv5",
        "-t",
        "devices/+/status",
    ]);
    let mut svc = Sub::start(&svc_args);

    // The device connects with a will, then dies without DISCONNECT.
    let mut dev_args = d1.mosquitto_args(server.mqtt);
    dev_args.extend(s(&[
        "-t",
        "devices/d1/x",
        "--will-topic",
        "devices/d1/status",
        "--will-payload",
        "offline",
        "--will-qos",
        "1",
    ]));
    let mut dev = Sub::start(&dev_args);
    server
        .wait_for("/api/v1/devices/d1", |v| v["online"] == true)
        .await;
    dev.kill9();
    assert_eq!(svc.next_message(), "offline");
    server
        .wait_for("/api/v1/devices/d1", |v| v["online"] == false)
        .await;

    // Services are read-only by default: their publish is denied.
    let mut args = svc_args[..10].to_vec();
    args.extend(s(&[
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        "devices/d1/commands/x",
        "-m",
        "reboot",
    ]));
    let out = mosquitto_pub(&args);
    assert!(String::from_utf8_lossy(&out.stderr)
        .to_lowercase()
        .contains("not authorized"));

    // A wrong token is refused.
    let mut bad = svc_args[..8].to_vec();
    bad.extend(s(&[
        "-P",
        "mrt_wrong",
        "-t",
        "devices/d1/telemetry",
        "-m",
        "{}",
    ]));
    assert!(!mosquitto_pub(&bad).status.success());
}

#[tokio::test]
async fn acknowledged_points_survive_kill_9() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let d = server.create_device("d1", tmp.path());
    const N: usize = 200;
    let lines: String = (0..N)
        .map(|i| format!("{{\"seq\":{i},\"n\":{i}}}\n"))
        .collect();
    let mut args = d.mosquitto_args(server.mqtt);
    args.extend(s(&["-q", "1", "-t", "devices/d1/telemetry", "-l"]));
    let mut child = std::process::Command::new("mosquitto_pub")
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(lines.as_bytes())
            .expect("write");
    }
    // mosquitto_pub exits 0 only once every QoS1 message was acknowledged.
    assert!(child.wait().expect("wait").success());
    let (mqtt, http) = (server.mqtt.to_string(), server.http.to_string());
    server.kill9();
    let server = Server::start_with(&data, &mqtt, &http, &[]);
    let (_, v) = server
        .api(
            "GET",
            "/api/v1/devices/d1/telemetry?metric=n&limit=10000",
            None,
        )
        .await;
    assert_eq!(
        points(&v),
        N,
        "every acknowledged point is there after kill -9"
    );
}

#[tokio::test]
async fn flags_override_env_which_overrides_the_config_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (file_dir, env_dir, flag_dir) = (
        tmp.path().join("file"),
        tmp.path().join("env"),
        tmp.path().join("flag"),
    );
    let config = tmp.path().join("mooring.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nmqtt_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\nmqtt_dev_addr = \"127.0.0.1:0\"\n",
            file_dir.display().to_string()
        ),
    )
    .expect("write config");
    let server = Server::start_custom(&file_dir, |cmd| {
        cmd.arg("--config").arg(&config);
    });
    assert!(file_dir.join("admin.token").exists());
    server.stop();
    let server = Server::start_custom(&env_dir, |cmd| {
        cmd.arg("--config")
            .arg(&config)
            .env("MOORING_DATA_DIR", &env_dir);
    });
    assert!(env_dir.join("admin.token").exists());
    server.stop();
    let server = Server::start_custom(&flag_dir, |cmd| {
        cmd.arg("--config")
            .arg(&config)
            .env("MOORING_DATA_DIR", &env_dir)
            .arg("--data-dir")
            .arg(&flag_dir);
    });
    assert!(flag_dir.join("admin.token").exists());
    server.stop();

    // Unknown keys and a non-loopback dev listener are refused with a clear message.
    std::fs::write(&config, "nope = 1\n").expect("write config");
    let out = std::process::Command::new(support::BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown field"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(support::BIN)
        .args(["serve", "--data-dir"])
        .arg(tmp.path().join("x"))
        .args([
            "--mqtt-dev-addr",
            "0.0.0.0:0",
            "--mqtt-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[tokio::test]
async fn api_over_tls_with_http_tls() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &["--http-tls"]);
    assert!(server
        .log_text()
        .contains(&format!("HTTP API listening on https://{}", server.http)));
    let url = format!("https://localhost:{}", server.http.port());
    let out = std::process::Command::new(support::BIN)
        .args(["device", "create", "t1", "--server", &url, "--data-dir"])
        .arg(&data)
        .arg("--out")
        .arg(tmp.path().join("t1"))
        .output()
        .expect("cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(support::BIN)
        .args(["device", "list", "--server", &url, "--data-dir"])
        .arg(&data)
        .output()
        .expect("cli");
    assert!(String::from_utf8_lossy(&out.stdout).contains("t1"));
}

#[tokio::test]
async fn policy_rules_with_tag_substitution() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = tmp.path().join("mooring.toml");
    std::fs::write(
        &config,
        r#"
[[policy.rules]]
principal = "device"
action = "both"
filter = "sites/{tag:site}/#"

[[policy.rules]]
principal = "device"
action = "subscribe"
filter = "fleet/broadcast/#"
"#,
    )
    .expect("config");
    let server = Server::start_with(
        &tmp.path().join("data"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--config", config.to_str().expect("utf8")],
    );
    let out = server.cli(&[
        "device",
        "create",
        "berlin-1",
        "--tag",
        "site=berlin",
        "--out",
        tmp.path().join("berlin-1").to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = support::Creds {
        dir: tmp.path().join("berlin-1"),
    };
    let publish = |topic: &str| {
        let mut args = d.mosquitto_args(server.mqtt);
        args.extend(s(&["-V", "mqttv5", "-q", "1", "-t", topic, "-m", "x"]));
        mosquitto_pub(&args)
    };
    let ok = publish("sites/berlin/door");
    assert!(
        ok.status.success() && ok.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let denied = publish("sites/paris/door");
    assert!(String::from_utf8_lossy(&denied.stderr)
        .to_lowercase()
        .contains("not authorized"));
    let denied = publish("fleet/broadcast/x");
    assert!(String::from_utf8_lossy(&denied.stderr)
        .to_lowercase()
        .contains("not authorized"));

    // The broadcast subscription is granted; a message from the dev listener reaches it.
    let mut args = d.mosquitto_args(server.mqtt);
    args.extend(s(&["-V", "mqttv5", "-t", "fleet/broadcast/#"]));
    let mut sub = Sub::start(&args);
    let dev = s(&[
        "-h",
        "127.0.0.1",
        "-p",
        &server.mqtt_dev.port().to_string(),
        "-t",
        "fleet/broadcast/all",
        "-m",
        "hello fleet",
    ]);
    assert!(mosquitto_pub(&dev).status.success());
    assert_eq!(sub.next_message(), "hello fleet");
}

#[tokio::test]
async fn retention_removes_old_points_and_keeps_new_ones() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = tmp.path().join("mooring.toml");
    std::fs::write(
        &config,
        "[telemetry]\nretention_days = 1\nretention_interval_secs = 1\n",
    )
    .expect("config");
    let server = Server::start_with(
        &tmp.path().join("data"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--config", config.to_str().expect("utf8")],
    );
    let d = server.create_device("d1", tmp.path());
    for payload in [r#"{"ts":1000,"t":1}"#, r#"{"t":2}"#] {
        let mut args = d.mosquitto_args(server.mqtt);
        args.extend(s(&["-q", "1", "-t", "devices/d1/telemetry", "-m", payload]));
        assert!(mosquitto_pub(&args).status.success());
    }
    let v = server
        .wait_for("/api/v1/devices/d1/telemetry?metric=t", |v| points(v) == 1)
        .await;
    assert_eq!(v["points"][0]["value"], 2.0);
}
